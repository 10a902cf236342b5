"""Self-activation inside Megatron-LM's training scripts, with no edit to Megatron-LM.

The installed ``paci_megatron.pth`` calls :func:`activate` at interpreter start: one scan of
``sys.argv`` and one environment lookup, nothing else unless ``--pipeline-schedule`` (or a
``--paci-*`` flag) is on the command line (the glue, :mod:`paci_megatron.megatron_lm`) or
``PACI_MEGATRON_CPU=1`` is set (:func:`paci_megatron.cpu.enable_megatron_lm_cpu_mode`).
Then an import hook patches Megatron-LM's modules right after Python executes them, from
whichever checkout the launch script imports (nothing is imported eagerly: at ``.pth``
time ``sys.path[0]`` is not yet the script's folder). ``PACI_MEGATRON_DISABLE=1`` switches
the ``.pth`` hook off (a checkout edited by ``paci-megatron patch`` is not affected).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["FLAG", "CPU_ENV", "DISABLE_ENV", "wanted", "activate", "PostImportHook"]

FLAG = "--pipeline-schedule"
CPU_ENV = "PACI_MEGATRON_CPU"
DISABLE_ENV = "PACI_MEGATRON_DISABLE"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def wanted(argv: Optional[Sequence[str]] = None, environ=None) -> tuple:
    """Which parts to activate for this command line: ``(glue, cpu)`` booleans.

    ``glue`` is True when ``--pipeline-schedule`` (or ``--pipeline-schedule=...``) or a
    ``--paci-*`` flag is among the arguments (a PACI flag without the schedule then gets
    a clear message instead of argparse's "unrecognized arguments"); ``cpu`` when
    ``PACI_MEGATRON_CPU`` is set to 1/true/yes/on (other values than those and
    0/false/no/off are reported on stderr).
    Both are False when ``PACI_MEGATRON_DISABLE`` is set to one of those values.
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    if str(environ.get(DISABLE_ENV, "")).lower() in _TRUE:
        return False, False
    glue = any(a == FLAG or a.startswith(FLAG + "=") or a.startswith("--paci-")
               for a in list(argv)[1:])
    value = str(environ.get(CPU_ENV, "")).lower()
    if value not in _TRUE + _FALSE:
        print(f"paci-megatron: {CPU_ENV}={environ.get(CPU_ENV)!r} is not understood: set it "
              "to 1 (CPU mode) or 0", file=sys.stderr, flush=True)
    return glue, value in _TRUE


class _Loader(importlib.abc.Loader):
    """Runs the wrapped loader, then the callbacks registered for the module."""

    def __init__(self, loader, callbacks: List[Callable]):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback(module)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


class PostImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that calls ``callback(module)`` after a module executes.

    Only the registered names are intercepted; each is located by the remaining finders,
    so the module comes from wherever Python would have found it. A callback sees the
    fully executed module and may rebind its attributes. A module already imported when
    the callback is registered gets it immediately.
    """

    def __init__(self) -> None:
        self.callbacks: Dict[str, List[Callable]] = {}
        self._busy = set()

    def register(self, name: str, callback: Callable) -> None:
        """Call ``callback(module)`` once module ``name`` has been executed."""
        if name in sys.modules:
            callback(sys.modules[name])
            return
        self.callbacks.setdefault(name, []).append(callback)

    def find_spec(self, fullname, path=None, target=None):
        callbacks = self.callbacks.get(fullname)
        if not callbacks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, self.callbacks.pop(fullname))
        return spec


_hook: Optional[PostImportHook] = None


def activate(argv: Optional[Sequence[str]] = None, environ=None,
             glue: bool = False) -> Optional[PostImportHook]:
    """Install the import hook if this command line asks for it (see module doc).

    Args:
        argv, environ: default ``sys.argv`` and ``os.environ``.
        glue: register the Megatron-LM glue even without ``--pipeline-schedule`` on the
            command line (what a checkout edited by ``paci-megatron patch`` does; the
            argument then defaults to ``1f1b``, Megatron's own schedule).

    Returns the hook, or None when nothing was asked for. Idempotent.
    """
    global _hook
    environ = os.environ if environ is None else environ
    if glue:  # an explicit activation: PACI_MEGATRON_DISABLE only switches the .pth off
        environ = {k: v for k, v in environ.items() if k != DISABLE_ENV}
    want_glue, want_cpu = wanted(argv, environ)
    want_glue = want_glue or glue
    if not (want_glue or want_cpu):
        return None
    if _hook is None:
        _hook = PostImportHook()
        sys.meta_path.insert(0, _hook)
    if want_cpu and not getattr(_hook, "cpu", False):
        from . import cpu as cpu_mode

        cpu_mode.register_megatron_lm_cpu_patches(_hook)
        _hook.cpu = True
    if want_glue and not getattr(_hook, "glue", False):
        from . import megatron_lm

        megatron_lm.register(_hook)
        _hook.glue = True
    return _hook
