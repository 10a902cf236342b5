"""CPU/gloo harness: run megatron-core's GPT model, DDP, optimizers and schedules on CPU.

megatron-core assumes CUDA in many places (receive buffers, token counters, causal masks,
the global memory buffer, rotary embeddings, param/grad buffers, optimizer type checks,
the model-parallel RNG tracker). :func:`enable_cpu_mode` redirects those assumptions so
the unmodified megatron-core code runs on CPU with the gloo backend:

1. ``torch.cuda.current_device()`` returns device index 0, ``torch.cuda.synchronize()``,
   ``torch.cuda.set_device()`` and ``torch.cuda.empty_cache()`` do nothing.
2. A :class:`torch.overrides.TorchFunctionMode` (:class:`CudaToCpuMode`) rewrites every
   ``device=`` argument naming CUDA (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``,
   a bare int) to CPU, makes ``Tensor.cuda()`` a no-op, ``Tensor.to("cuda")`` stay on CPU,
   and makes ``Tensor.type()`` report CUDA type names (Megatron's optimizers and clipping
   assert on ``'torch.cuda.FloatTensor'``).
3. The model-parallel RNG tracker (``megatron.core.tensor_parallel.random``) keeps CPU
   generator states in place of CUDA ones, so ``model_parallel_cuda_manual_seed`` works.

Where CUDA is available every function here is a no-op: the GPU path is untouched.
The mode is thread-local (PyTorch's function-mode stack); :func:`enable_cpu_mode` pushes
it on the calling thread, which is the thread that runs the training loop.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "CudaToCpuMode",
    "enable_cpu_mode",
    "enable_megatron_lm_cpu_mode",
    "register_megatron_lm_cpu_patches",
    "cpu_mode_enabled",
    "init_distributed_cpu",
]

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}

_state = threading.local()
_installed_globals = False


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


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU; ``elapsed_time`` is 0 ms."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def wait(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _install_globals() -> None:
    """Patch the ``torch.cuda`` functions that assume a GPU (nothing of megatron)."""
    global _installed_globals
    if _installed_globals:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: _NullStream()
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    # RNG: the "CUDA" generator of megatron's tracker is the CPU default generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    _installed_globals = True


def _patch_megatron_rng(mc_random) -> None:
    """Give ``megatron.core.tensor_parallel.random`` CPU generator states for CUDA ones."""
    mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)

    class _DropSameGeneratorWarning(logging.Filter):
        # On CPU the tracker's generator IS the CPU generator, so megatron's check that
        # "CPU RNG state changed within GPU RNG context" fires by construction.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mc_random.__name__).addFilter(_DropSameGeneratorWarning())


def cpu_mode_enabled() -> bool:
    """True if :func:`enable_cpu_mode` is active on this thread."""
    return getattr(_state, "mode", None) is not None


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


def _enter_mode() -> None:
    """torch.cuda stand-ins and :class:`CudaToCpuMode` on this thread (no megatron)."""
    if cpu_mode_enabled():
        return
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _install_globals()
    mode = CudaToCpuMode()
    mode.__enter__()
    _state.mode = mode


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


def _installed_megatron_core_file(relative: str) -> Optional[str]:
    """Path of a file of the installed megatron-core wheel (None if not installed)."""
    try:
        from importlib import metadata

        path = metadata.distribution("megatron-core").locate_file(relative)
    except Exception:  # pragma: no cover - megatron-core is a dependency
        return None
    return str(path) if os.path.exists(str(path)) else None


def _use_installed_dataset_helper(datasets_pkg) -> None:
    """Let a Megatron-LM checkout's ``megatron.core.datasets`` find the compiled helper.

    A source checkout has ``helpers.cpp`` but no ``helpers_cpp`` extension (Megatron
    compiles it with ``make`` at start-up, which :func:`enable_megatron_lm_cpu_mode`
    turns off); the megatron-core wheel ships it compiled. Its folder is appended to the
    package's search path, after the checkout's own.
    """
    here = list(getattr(datasets_pkg, "__path__", []))
    has_own = any(
        name.startswith("helpers_cpp") for d in here if os.path.isdir(d) for name in os.listdir(d)
    )
    folder = _installed_megatron_core_file("megatron/core/datasets")
    if not has_own and folder is not None and folder not in here:
        datasets_pkg.__path__.append(folder)


def _no_op(name: str):
    def skipped(*args, **kwargs):
        return None

    skipped.__name__ = name
    skipped.__doc__ = f"{name} is skipped in CPU mode (paci_megatron.cpu)."
    return skipped


def enable_megatron_lm_cpu_mode() -> None:
    """Let Megatron-LM's own training loop (``pretrain_gpt.py``) run on CPU with gloo.

    Everything :func:`enable_cpu_mode` does, plus what ``megatron.training`` needs
    (MEGATRON_NOTES.md, "Megatron-LM's own pretrain_gpt.py on CPU"): one device is
    reported, ``torch.cuda.is_available()`` is True for ``megatron.training`` callers
    only, streams are stand-ins. The module-level pieces (the dataset helper's ``make``,
    the fused-kernel ``nvcc`` build, the RNG tracker's CUDA states) are patched when
    those modules are imported: see :func:`register_megatron_lm_cpu_patches`.

    Launch with ``--distributed-backend gloo``, ``--transformer-impl local`` and the
    ``--no-*-fusion`` flags; Transformer Engine, Apex, CUDA graphs and NCCL are not
    available on CPU.
    """
    _enter_mode()
    cuda = torch.cuda
    cuda.device_count = lambda: 1
    if not hasattr(cuda.is_available, "__wrapped__"):
        cuda.is_available = _megatron_training_sees_cuda(cuda.is_available)


def register_megatron_lm_cpu_patches(hook) -> None:
    """Enable :func:`enable_megatron_lm_cpu_mode` and register its per-module patches.

    Args:
        hook: a :class:`paci_megatron.hook.PostImportHook`; each patch runs right after
            its module is executed, from whichever copy of Megatron is on ``sys.path``.
    """
    enable_megatron_lm_cpu_mode()
    hook.register("megatron.core.tensor_parallel.random", _patch_megatron_rng)
    hook.register("megatron.core.datasets", _use_installed_dataset_helper)
    hook.register(
        "megatron.core.datasets.utils",
        lambda m: setattr(m, "compile_helpers", _no_op("compile_helpers")),
    )
    hook.register(
        "megatron.legacy.fused_kernels",
        lambda m: setattr(m, "load", _no_op("fused_kernels.load")),
    )


def init_distributed_cpu(timeout_s: float = 120.0, backend: str = "gloo") -> None:
    """Initialise ``torch.distributed`` from torchrun's environment with gloo.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``). Does nothing if the default group exists already.

    Args:
        timeout_s: timeout of every collective and point-to-point wait, in seconds.
        backend: process-group backend; ``gloo`` on CPU.
    """
    import datetime

    if torch.distributed.is_initialized():
        return
    torch.distributed.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
    )


def maybe_cpu(device: Optional[str]) -> bool:
    """Enable CPU mode if ``device`` is ``"cpu"`` (or None and CUDA is missing)."""
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return enable_cpu_mode(force=True)
    return False
