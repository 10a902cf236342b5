"""CPU/gloo harness: run megatron-core's GPT model, DDP, optimizers and schedules on CPU.

megatron-core assumes CUDA in many places (receive buffers, token counters, causal masks,
param/grad buffers, optimizer type checks, the RNG tracker; docs/design.md, "megatron-core
on CPU"). :func:`enable_cpu_mode` redirects them so that the unmodified code
runs on CPU with gloo: ``torch.cuda``'s device, stream and RNG functions get CPU
stand-ins, a :class:`CudaToCpuMode` rewrites every device argument naming CUDA to CPU (and
reports CUDA type names, which Megatron's optimizers assert on), and the model-parallel
RNG tracker keeps CPU generator states.

Every patch is listed in one table, :data:`PATCHES`; the originals are kept in one object
and :func:`disable_cpu_mode` puts them back (:func:`cpu_mode`: the context-manager form).
Where CUDA is available nothing changes unless forced. The function mode is thread-local:
it applies to the thread that enabled it, the one that runs the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["PATCHES", "CudaToCpuMode", "enable_cpu_mode", "disable_cpu_mode", "cpu_mode",
           "enable_megatron_lm_cpu_mode", "register_megatron_lm_cpu_patches",
           "cpu_mode_enabled"]

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor"}


def _is_cuda_device(device: Any) -> bool:
    """True if ``device`` names a CUDA device (str, ``torch.device`` or a bare int index)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Torch function mode that keeps every tensor on CPU although code asks for CUDA.

    Rewrites ``device=`` keywords, positional devices of ``Tensor.to``, ``Tensor.cuda()``
    and ``Tensor.type()`` (no argument: reports the CUDA type name of the dtype, as
    megatron-core's optimizer code expects). Active only on the thread that entered it;
    PyTorch does not apply it inside custom autograd ``backward`` functions.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name == "type" and args and isinstance(args[0], torch.Tensor) and len(args) == 1:
            if "dtype" not in kwargs:
                return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args, **kwargs))
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if name in ("pin_memory",) and args and isinstance(args[0], torch.Tensor):
            return args[0]
        return func(*args, **kwargs)


class _NullEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU: complete at once, ``elapsed_time`` 0 ms."""

    def __init__(self, *args, **kwargs):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0

    def record_event(self, *args, **kwargs) -> "_NullEvent":
        return _NullEvent()

    def __getattr__(self, name):  # record, wait, synchronize, wait_stream, ...: no-ops
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullStream(_NullEvent):
    """Stand-in for ``torch.cuda.Stream`` (and its ``with`` form) on CPU: does nothing."""


def _cuda_rng_state(device="cuda"):
    return torch.get_rng_state()


def _set_cuda_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _returns(value: Any) -> Callable[..., Any]:
    """A new function returning ``value`` (one object per patched name: torch's compiler
    refuses one function registered under two torch names)."""
    return lambda *args, **kwargs: value


def _patch_megatron_rng(mc_random) -> None:
    """Give ``megatron.core.tensor_parallel.random`` CPU generator states for CUDA ones
    (and drop its log warning that the two generators are one, which stays dropped)."""
    _apply("megatron.core.tensor_parallel.random", mc_random)

    class _DropSameGeneratorWarning(logging.Filter):
        # On CPU the tracker's generator IS the CPU generator, so megatron's check that
        # "CPU RNG state changed within GPU RNG context" fires by construction.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mc_random.__name__).addFilter(_DropSameGeneratorWarning())


def cpu_mode_enabled() -> bool:
    """True if :func:`enable_cpu_mode` is active on this thread."""
    return getattr(_STATE.threads, "mode", None) is not None


def enable_cpu_mode(force: bool = False) -> bool:
    """Make megatron-core run on CPU in this process (idempotent).

    Args:
        force: enable the harness even where CUDA is available (tests of the harness).

    Returns:
        True if CPU mode is active after the call, False where CUDA is available and
        ``force`` is False (then nothing is changed).
    """
    if torch.cuda.is_available() and not force:
        return False
    if cpu_mode_enabled():
        return True
    _enter_mode()
    from megatron.core.tensor_parallel import random as mc_random

    _patch_megatron_rng(mc_random)
    return True


def disable_cpu_mode() -> None:
    """Undo everything the CPU mode changed: every replaced attribute of :data:`PATCHES`
    gets its original back and this thread's :class:`CudaToCpuMode` is popped."""
    mode = getattr(_STATE.threads, "mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        _STATE.threads.mode = None
    for target, name, original in reversed(_STATE.replaced):
        setattr(target, name, original)
    _STATE.replaced.clear()
    for key in _STATE.environ:
        os.environ.pop(key, None)
    _STATE.environ.clear()


@contextlib.contextmanager
def cpu_mode(force: bool = True) -> Iterator[bool]:
    """``with cpu_mode(): ...``: :func:`enable_cpu_mode` for the block, then
    :func:`disable_cpu_mode`. Yields whether the mode is active."""
    active = enable_cpu_mode(force=force)
    try:
        yield active
    finally:
        disable_cpu_mode()


def _enter_mode() -> None:
    """torch.cuda stand-ins and :class:`CudaToCpuMode` on this thread (no megatron)."""
    if cpu_mode_enabled():
        return
    if "TORCHDYNAMO_DISABLE" not in os.environ:  # compiling fusions on CPU takes minutes
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
        _STATE.environ.append("TORCHDYNAMO_DISABLE")
    _apply("torch.cuda", torch.cuda)
    _apply("torch.cuda.random", torch.cuda.random)
    mode = CudaToCpuMode()
    mode.__enter__()
    _STATE.threads.mode = mode


def _megatron_training_sees_cuda(real_is_available):
    """``torch.cuda.is_available`` that answers True only to ``megatron.training`` code.

    ``initialize_megatron`` asserts CUDA; everywhere else (PyTorch's compiler, autocast,
    megatron-core) the truthful False keeps CPU code paths.
    """

    def is_available() -> bool:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.training"):
            return True
        return real_is_available()

    is_available.__wrapped__ = real_is_available
    return is_available


def _compiled_dataset_helper_folder() -> Optional[str]:
    """The installed megatron-core's ``megatron/core/datasets`` folder that holds the
    compiled ``helpers_cpp`` (where the distribution says, else site-packages: a
    megatron-core built from a checkout points back at the checkout), or None."""
    import sysconfig
    from importlib import metadata

    try:
        where = [str(metadata.distribution("megatron-core").locate_file("megatron/core/datasets"))]
    except metadata.PackageNotFoundError:  # pragma: no cover - megatron-core is a dependency
        where = []
    where += [os.path.join(sysconfig.get_paths()[k], "megatron", "core", "datasets")
              for k in ("platlib", "purelib")]
    return next((d for d in where if os.path.isdir(d)
                 and any(n.startswith("helpers_cpp") for n in os.listdir(d))), None)


def _use_installed_dataset_helper(datasets_pkg) -> None:
    """Let a Megatron-LM checkout's ``megatron.core.datasets`` find the compiled helper.

    A source checkout has ``helpers.cpp`` but no ``helpers_cpp`` extension (Megatron
    compiles it with ``make`` at start-up, which :func:`enable_megatron_lm_cpu_mode`
    turns off); the installed megatron-core has it compiled. Its folder is appended to the
    package's search path, after the checkout's own.
    """
    here = list(getattr(datasets_pkg, "__path__", []))
    has_own = any(n.startswith("helpers_cpp") for d in here if os.path.isdir(d) for n in os.listdir(d))
    folder = _compiled_dataset_helper_folder()
    if not has_own and folder is not None and folder not in here:
        datasets_pkg.__path__.append(folder)


def _no_op(name: str):
    def skipped(*args, **kwargs):
        return None

    skipped.__name__ = name
    skipped.__doc__ = f"{name} is skipped in CPU mode (paci_megatron.cpu)."
    return skipped


class _Wrap:
    """A :data:`PATCHES` value made from the original attribute: ``make(original)``."""

    def __init__(self, make: Callable[[Any], Any]):
        self.make = make


#: Every patch of the CPU mode: target module -> {name: CPU stand-in}. ``torch.cuda`` and
#: ``megatron.core.tensor_parallel.random`` are patched by :func:`enable_cpu_mode`; the
#: Megatron-LM entries by :func:`enable_megatron_lm_cpu_mode` (``torch.cuda`` again, for
#: ``megatron.training``) and, when they are imported, :func:`register_megatron_lm_cpu_patches`.
PATCHES: Dict[str, Dict[str, Callable]] = {
    "torch.cuda": {
        "current_device": _returns(0), "synchronize": _returns(None),
        "set_device": _returns(None), "empty_cache": _returns(None),
        "device_count": _returns(0), "Stream": _NullStream,
        "Event": _NullEvent, "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "stream": lambda *a, **k: _NullStream(), "max_memory_allocated": _returns(0),
        "memory_allocated": _returns(0), "memory_reserved": _returns(0),
        "max_memory_reserved": _returns(0),
        # RNG: the "CUDA" generator of megatron's tracker is the CPU default generator
        "get_rng_state": _cuda_rng_state, "set_rng_state": _set_cuda_rng_state,
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": _returns(None),
    },
    "torch.cuda.random": {"get_rng_state": _cuda_rng_state},
    "megatron.core.tensor_parallel.random": {
        "_get_cuda_rng_state": lambda *a, **k: torch.get_rng_state(),
        "_set_cuda_rng_state": lambda new_state, *a, **k: torch.set_rng_state(new_state),
    },
    # Megatron-LM's training loop (enable_megatron_lm_cpu_mode)
    "torch.cuda (Megatron-LM)": {
        "device_count": lambda: 1,
        "is_available": _Wrap(_megatron_training_sees_cuda),
    },
    "megatron.core.datasets.utils": {"compile_helpers": _no_op("compile_helpers")},
    "megatron.legacy.fused_kernels": {"load": _no_op("fused_kernels.load")},
    # megatron-core 0.16's MoE router reads this name, bound only when TE imports
    "megatron.core.transformer.moe.moe_utils": {"te_general_gemm": None},
}


@dataclass
class _CpuModeState:
    """Everything the CPU mode changed, to undo it: the replaced attributes (in order)
    and, per thread, the pushed :class:`CudaToCpuMode`."""

    replaced: List[Tuple[Any, str, Any]] = field(default_factory=list)
    threads: threading.local = field(default_factory=threading.local)
    environ: List[str] = field(default_factory=list)  # variables the mode set

    def patch(self, target: Any, name: str, value: Any) -> None:
        """``setattr(target, name, value)``, remembering the first original."""
        known = [orig for t, n, orig in self.replaced if t is target and n == name]
        if not known:
            known = [getattr(target, name, None)]
            self.replaced.append((target, name, known[0]))
        setattr(target, name, value.make(known[0]) if isinstance(value, _Wrap) else value)


_STATE = _CpuModeState()


def _apply(entry: str, module: Any) -> None:
    """Apply :data:`PATCHES` ``[entry]`` to ``module``."""
    for name, value in PATCHES[entry].items():
        _STATE.patch(module, name, value)


def enable_megatron_lm_cpu_mode() -> None:
    """Let Megatron-LM's own training loop (``pretrain_gpt.py``) run on CPU with gloo.

    Everything :func:`enable_cpu_mode` does, plus what ``megatron.training`` needs
    (docs/design.md, "megatron-core on CPU"): one device is
    reported, ``torch.cuda.is_available()`` is True for ``megatron.training`` callers
    only, streams are stand-ins. The module-level pieces (the dataset helper's ``make``,
    the fused-kernel ``nvcc`` build, the RNG tracker's CUDA states) are patched when
    those modules are imported: see :func:`register_megatron_lm_cpu_patches`.

    Launch with ``--distributed-backend gloo``, ``--transformer-impl local`` and the
    ``--no-*-fusion`` flags; Transformer Engine, Apex, CUDA graphs and NCCL are not
    available on CPU.
    """
    _enter_mode()
    _apply("torch.cuda (Megatron-LM)", torch.cuda)


def register_megatron_lm_cpu_patches(hook) -> None:
    """Enable :func:`enable_megatron_lm_cpu_mode` and register its per-module patches.

    Args:
        hook: a :class:`paci_megatron.hook.PostImportHook`; each patch runs right after
            its module is executed, from whichever copy of Megatron is on ``sys.path``.
    """
    enable_megatron_lm_cpu_mode()
    hook.register("megatron.core.tensor_parallel.random", _patch_megatron_rng)
    hook.register("megatron.core.datasets", _use_installed_dataset_helper)
    for name in ("megatron.core.datasets.utils", "megatron.legacy.fused_kernels",
                 "megatron.core.transformer.moe.moe_utils"):
        hook.register(name, lambda module, name=name: _apply(name, module))
