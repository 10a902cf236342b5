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
import threading
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CudaToCpuMode", "enable_cpu_mode", "cpu_mode_enabled", "init_distributed_cpu"]

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
    """Patch the ``torch.cuda`` functions and megatron RNG helpers that assume a GPU."""
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

    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)

    class _DropSameGeneratorWarning(logging.Filter):
        # On CPU the tracker's generator IS the CPU generator, so megatron's check that
        # "CPU RNG state changed within GPU RNG context" fires by construction.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mc_random.__name__).addFilter(_DropSameGeneratorWarning())
    _installed_globals = True


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
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _install_globals()
    mode = CudaToCpuMode()
    mode.__enter__()
    _state.mode = mode
    return True


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
