"""paci-megatron: asynchronous, bubble-free pipeline parallelism (PACI) for Megatron-core.

Every stage runs 1F1B continuously, never flushing between iterations, and applies its
own optimizer update after every ``a`` backward micro-batches, with no collective across
stages (arXiv 2606.07881). Public entry points:

- :class:`PACISchedule` / :func:`get_forward_backward_func`: a ``forward_backward_func``
  with Megatron's exact signature, plus ``drain()``;
- :class:`PACIOptimizer`: the per-stage wrapper around ``get_megatron_optimizer``'s result;
- :class:`PACIConfig`, :func:`validate_setup`, :class:`PACIConfigError`;
- :mod:`paci_megatron.plan`: the pure schedule IR; :mod:`paci_megatron.cpu`: CPU/gloo mode.
"""

from .config import PACIConfig, PACIConfigError, validate_setup
from .optimizer import PACIOptimizer
from .plan import Action, Kind, StageState, drift_bound
from .schedule import PACICommunicationError, PACISchedule, get_forward_backward_func
from .telemetry import DriftBoundError, DriftTelemetry

__version__ = "0.1.0"

__all__ = [
    "PACIConfig",
    "PACIConfigError",
    "validate_setup",
    "PACIOptimizer",
    "PACISchedule",
    "PACICommunicationError",
    "get_forward_backward_func",
    "Action",
    "Kind",
    "StageState",
    "drift_bound",
    "DriftTelemetry",
    "DriftBoundError",
]
