"""paci-megatron: asynchronous, bubble-free pipeline parallelism (PACI) for Megatron-core.

Every stage runs 1F1B continuously, never flushing between iterations, and applies its
own optimizer update after every ``a`` backward micro-batches, with no collective across
stages (arXiv 2606.07881). Public entry points:

- :class:`PACISchedule` / :func:`get_forward_backward_func`: a ``forward_backward_func``
  with Megatron's exact signature, plus ``drain()``;
- :class:`PACIOptimizer`: the per-stage wrapper around ``get_megatron_optimizer``'s result;
- :class:`PACIConfig` (its ``resolve`` gives the frozen :class:`Settings`), :func:`build`
  (the wrapper and the schedule from them), :func:`validate_setup`, :class:`PACIConfigError`;
- :mod:`paci_megatron.plan`: the pure schedule IR; :mod:`paci_megatron.cpu`: CPU/gloo mode.
"""

import importlib
from typing import Any

# Public names -> defining module. Imported on first use, so that the pure planner
# (``paci_megatron.plan``) and the simulator load without megatron-core.
_EXPORTS = {
    "PACIConfig": "config",
    "PACIConfigError": "config",
    "validate_setup": "config",
    "PACIOptimizer": "optimizer",
    "NonFiniteGradientError": "optimizer",
    "PACISchedule": "schedule",
    "build": "schedule",
    "Settings": "config",
    "PACICommunicationError": "p2p",
    "get_forward_backward_func": "schedule",
    "Action": "plan",
    "Kind": "plan",
    "StageState": "plan",
    "drift_bound": "plan",
    "DriftTelemetry": "telemetry",
    "DriftBoundError": "telemetry",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'paci_megatron' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)
