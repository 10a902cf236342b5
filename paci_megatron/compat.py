"""Every megatron-core / PyTorch version difference paci-megatron depends on, and nothing else.

Supported: the megatron-core releases of :mod:`paci_megatron.versions`, PyTorch releases that
have ``torch._C._autograd._unsafe_set_version_counter``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["MEGATRON_CORE_VERSION", "init_device_kwargs", "backward_step", "forward_step",
           "get_tensor_shapes", "get_model_config", "get_model_type", "set_version_counters",
           "process_groups", "get_megatron_muon_optimizer", "muon_module", "finalize_stage_local",
           "ramp_iterations", "step_schedule_supported", "batch_size_steps"]

try:
    from megatron.core import package_info as _pkg

    MEGATRON_CORE_VERSION = tuple(int(x) for x in _pkg.__version__.split(".")[:2])
except Exception:  # pragma: no cover - megatron-core is a hard dependency
    MEGATRON_CORE_VERSION = (0, 0)


def set_version_counters(tensors: Sequence[torch.Tensor], versions: Sequence[int]) -> None:
    """Set the autograd version counter of each tensor (undo in-place bumps).

    PyTorch 2.13 takes a tuple of tensors and a tuple of versions; older releases one
    tensor and one int (docs/design.md, "Weights seen by a backward").

    Raises:
        RuntimeError: the running PyTorch has no ``_unsafe_set_version_counter``; PACI's
            fp32 in-place updates then need the bf16 path (``--bf16``) or a newer PyTorch.
    """
    fn = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if fn is None:
        raise RuntimeError(
            f"PyTorch {torch.__version__} has no torch._C._autograd._unsafe_set_version_counter: "
            "PACI cannot update fp32 parameters in place under in-flight graphs. "
            "Use --bf16 (Megatron's mixed-precision optimizer) or PyTorch >= 2.1.")
    if not tensors:
        return
    try:
        fn(tuple(tensors), tuple(int(v) for v in versions))
    except TypeError:
        for t, v in zip(tensors, versions):
            fn(t, int(v))


def init_device_kwargs(device: torch.device) -> Dict[str, Any]:
    """Keywords binding ``torch.distributed.init_process_group`` to this rank's device:
    ``{"device_id": device}`` where the running PyTorch takes it (2.3+; NCCL then creates
    its communicators eagerly), else none."""
    params = inspect.signature(dist.init_process_group).parameters
    return {"device_id": device} if "device_id" in params else {}


def _call_with_supported(fn: Callable, kwargs: Dict[str, Any]) -> Any:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def forward_step(**kwargs: Any):
    """megatron-core's ``schedules.forward_step`` with the keywords this version accepts.

    Keywords not known to the installed version (``cp_group_size``, ``is_last_stage``,
    ``vp_stage``, ...) are dropped. Returns ``(output_tensor, num_tokens)``.
    """
    from megatron.core.pipeline_parallel import schedules

    return _call_with_supported(schedules.forward_step, kwargs)


def backward_step(input_tensor, output_tensor, output_tensor_grad, model_type, config):
    """megatron-core's ``schedules.backward_step`` across its signature changes.

    0.14 takes an extra pipeline size argument, 0.15/0.16 ``(input_tensor, output_tensor,
    output_tensor_grad, model_type, config)``, 0.17+ drops ``model_type``.
    Returns the gradient w.r.t. ``input_tensor`` (None on the first stage).
    """
    from megatron.core.pipeline_parallel import schedules

    names = list(inspect.signature(schedules.backward_step).parameters)
    values = {"input_tensor": input_tensor, "output_tensor": output_tensor,
              "output_tensor_grad": output_tensor_grad, "model_type": model_type, "config": config}
    if "pipeline_model_parallel_size" in names:
        from megatron.core import parallel_state

        values["pipeline_model_parallel_size"] = parallel_state.get_pipeline_model_parallel_world_size()
    return schedules.backward_step(*[values[n] for n in names if n in values])


def process_groups(pg_collection=None, p2p_communicator=None):
    """``(pp_group, tp_group, cp_group)`` of one call, as Megatron's 1F1B takes them.

    From ``pg_collection`` (a single-module ``ProcessGroupCollection``, megatron-core 0.14+)
    and ``p2p_communicator.pp_group`` where given, else from ``parallel_state``. The caller
    refuses multi-module ones first (a row of :data:`paci_megatron.config.REFUSALS`).
    """
    from megatron.core import parallel_state as ps

    groups = [getattr(p2p_communicator, "pp_group", None) or getattr(pg_collection, "pp", None),
              getattr(pg_collection, "tp", None), getattr(pg_collection, "cp", None)]
    defaults = (ps.get_pipeline_model_parallel_group, ps.get_tensor_model_parallel_group,
                ps.get_context_parallel_group)
    return tuple(default() if g is None else g for g, default in zip(groups, defaults))


def get_tensor_shapes(*, seq_length, micro_batch_size, decoder_seq_length, config, tp_group,
                      cp_group):
    """Shapes of the activations that cross stages (megatron-core's ``get_tensor_shapes``).

    Returns a list of ``(seq_length / cp / (tp if sequence parallel), micro_batch_size,
    hidden_size)`` tuples.
    """
    from megatron.core.pipeline_parallel import schedules

    return _call_with_supported(
        schedules.get_tensor_shapes,
        {"seq_length": seq_length, "micro_batch_size": micro_batch_size,
         "decoder_seq_length": decoder_seq_length, "config": config, "tp_group": tp_group,
         "cp_group": cp_group})


def get_model_config(model):
    """megatron-core's ``get_model_config`` (the TransformerConfig of a wrapped model)."""
    from megatron.core.utils import get_model_config as _get

    return _get(model)


def get_model_type(model):
    """megatron-core's ``get_model_type``."""
    from megatron.core.utils import get_model_type as _get

    return _get(model)


def muon_module():
    """megatron-core's ``megatron.core.optimizer.muon`` (Muon for 2-D weights, chained with
    Adam; from 0.18 a shim over ``optimizer.emerging_optimizers``), usable on Python < 3.12:
    ``typing`` gains the no-op ``override`` decorator that ``emerging-optimizers`` imports
    (the module is reloaded if its optional import had failed on it), and megatron-core
    0.16's keywords are adapted to emerging-optimizers 0.3.

    Raises:
        ImportError: ``emerging-optimizers`` (with ``absl-py`` and ``triton``) is missing.
    """
    import importlib
    import typing

    from megatron.core.optimizer import muon

    # 0.18+: muon is a shim over the emerging-optimizers registry, which holds the flag
    flags = muon if hasattr(muon, "HAVE_EMERGING_OPTIMIZERS") else importlib.import_module(
        "megatron.core.optimizer.emerging_optimizers")
    if not getattr(flags, "HAVE_EMERGING_OPTIMIZERS", False) and not hasattr(typing, "override"):
        typing.override = lambda method: method
        flags = importlib.reload(flags)  # same module object: names imported from it stay valid
    if not getattr(flags, "HAVE_EMERGING_OPTIMIZERS", False):
        raise ImportError("Muon needs the emerging-optimizers package: pip install absl-py triton "
                          "&& pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0")
    if flags is muon and not hasattr(muon, "HAVE_EO_V02"):
        _old_muon_keywords(muon)
    return muon


def get_megatron_muon_optimizer(config, model_chunks):
    """megatron-core's ``get_megatron_muon_optimizer`` through :func:`muon_module`."""
    return muon_module().get_megatron_muon_optimizer(config, list(model_chunks))


def _old_muon_keywords(muon) -> None:
    """megatron-core 0.16 calls emerging-optimizers by its pre-0.2 keywords (``use_nesterov``
    for ``nesterov``, ``mode`` for ``tp_mode``), which 0.2+ renamed; 0.17+ use either."""
    base = muon.OrthogonalizedOptimizer
    if "use_nesterov" not in inspect.signature(base.__init__).parameters:
        init = base.__init__

        def __init__(self, *args, use_nesterov=None, **kwargs):
            if use_nesterov is not None:
                kwargs["nesterov"] = use_nesterov
            init(self, *args, **kwargs)

        base.__init__ = __init__
    ns = muon.newton_schulz_tp
    if "mode" not in inspect.signature(ns).parameters:
        muon.newton_schulz_tp = lambda x, mode="duplicated", **kw: ns(x, tp_mode=mode, **kw)


def finalize_stage_local(model: Sequence[torch.nn.Module], config) -> None:
    """The stage-local parts of ``finalize_model_grads`` besides DDP's own grad sync, as
    far as the installed release has them: the TP all-reduce of grads replicated across
    TP ranks (layer norms with sequence parallelism, ...; a no-op with TP = 1); for MoE the
    router expert-bias update (0.14+), the quantile-balancing update (0.19+) and the reset
    of the per-window tensors (tokens per expert, global aux-loss tracker; 0.15+). Their
    collectives stay within the stage (TP x DP x CP); nothing crosses stages.

    Raises:
        RuntimeError: megatron-core has no stage-local layer-norm grad all-reduce.
    """
    import importlib

    from megatron.core import parallel_state as ps

    # The package re-exports the function under the module's name: import the module.
    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    fn = getattr(fmg, "_allreduce_non_tensor_model_parallel_grads", None) or getattr(
        fmg, "_allreduce_layernorm_grads", None)
    if fn is None:  # pragma: no cover - depends on the installed version
        raise RuntimeError("this megatron-core has no stage-local layer-norm grad all-reduce; "
                           "use --tensor-model-parallel-size 1 with PACI")
    model = list(model)
    _call_with_supported(fn, {"model": model, "config": config})
    if getattr(config, "moe_router_enable_expert_bias", False):
        fmg._update_router_expert_bias(model, config)
    if getattr(config, "moe_router_load_balancing_type", None) == "quantile_balancing":
        fmg._update_router_qb_beta(model, config,
                                   dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))
    if hasattr(fmg, "reset_model_temporary_tensors"):
        fmg.reset_model_temporary_tensors(config, model)


def ramp_supported() -> bool:
    """Whether the installed megatron-core still ramps the batch size
    (``_build_num_microbatches_calculator`` takes ``rampup_batch_size``: up to 0.17)."""
    import inspect

    from megatron.core import num_microbatches_calculator as nmc

    return "rampup_batch_size" in inspect.signature(
        nmc._build_num_microbatches_calculator).parameters


def ramp_iterations(rampup_batch_size: Sequence[int], global_batch_size: int,
                    micro_batch_size: int, data_parallel_size: int,
                    decrease_batch_size_if_needed: bool = False) -> List[Tuple[int, int, int]]:
    """The iterations of Megatron's batch-size ramp (``--rampup-batch-size START INCREMENT
    SAMPLES``), as megatron-core's own calculator steps through them: ``(samples consumed
    before the iteration, global batch size, micro-batches per iteration)`` for every
    iteration until the batch reaches ``global_batch_size`` (that iteration included).

    Returns ``[]`` where megatron-core ignores the ramp (0.18 on: ``rampup_batch_size`` is
    deprecated there and its calculator is built without it, so Megatron-LM trains with a
    constant batch).

    Raises:
        ValueError: megatron-core's calculator refuses the ramp (its message).
    """
    from megatron.core import num_microbatches_calculator as nmc

    if not ramp_supported():
        return []
    calculator = nmc._build_num_microbatches_calculator(  # megatron-core's, not re-derived
        1, list(rampup_batch_size), global_batch_size, micro_batch_size, data_parallel_size,
        decrease_batch_size_if_needed)  # rank 1: it logs on rank 0 only
    out, consumed = [], 0
    while True:
        calculator.update(consumed, False)
        batch = calculator.get_current_global_batch_size()
        out.append((consumed, batch, calculator.get()))
        if batch >= global_batch_size or len(out) > 10_000_000:
            return out
        consumed += batch


def step_schedule_supported() -> bool:
    """Whether the installed megatron-core has the step batch-size schedule
    (``_build_num_microbatches_calculator`` takes ``step_batch_size_schedule``: 0.18 on)."""
    import inspect

    from megatron.core import num_microbatches_calculator as nmc

    return "step_batch_size_schedule" in inspect.signature(
        nmc._build_num_microbatches_calculator).parameters


def batch_size_steps(micro_batch_size: int, data_parallel_size: int, *,
                     global_batch_size: Optional[int] = None,
                     rampup_batch_size: Optional[Sequence[int]] = None,
                     step_batch_size_schedule: Optional[str] = None,
                     seq_length: Optional[int] = None,
                     decrease_batch_size_if_needed: bool = False
                     ) -> List[Tuple[int, int, int, int]]:
    """Where megatron-core's calculator changes the global batch, as Megatron-LM's training
    loop steps through it (``update_num_microbatches(consumed_samples)`` before each
    iteration): ``(iteration, samples consumed before it, global batch, micro-batches per
    iteration m)`` for iteration 0 and for every iteration whose batch differs from the one
    before; the last entry's batch holds to the end of training.

    Args:
        step_batch_size_schedule: Megatron-LM's ``--step-batch-size-schedule``
            (``"THRESHOLD:BATCH ..."``, megatron-core 0.18 on); with ``seq_length`` its
            thresholds are tokens, as Megatron-LM passes them.
        rampup_batch_size: ``--rampup-batch-size START INCREMENT SAMPLES``
            (:func:`ramp_iterations`; ignored from megatron-core 0.18 on) up to
            ``global_batch_size``.

    Returns:
        ``[]`` for a constant batch. An entry's ``m`` is 0 where its batch is smaller than
        one micro-batch per DP rank (megatron-core allows that for a schedule's already
        consumed entries after a scale-up).

    Raises:
        ValueError: megatron-core's calculator refuses the schedule (its message), or
            ``step_batch_size_schedule`` on a megatron-core without it.
    """
    from megatron.core import num_microbatches_calculator as nmc

    steps: List[Tuple[int, int, int, int]] = []
    if step_batch_size_schedule is not None:
        if not step_schedule_supported():
            raise ValueError(f"megatron-core {'.'.join(map(str, MEGATRON_CORE_VERSION))} has "
                             "no step batch-size schedule (megatron-core 0.18 on)")
        try:  # megatron-core's parser and calculator, not re-derived
            calculator = nmc._build_num_microbatches_calculator(
                1, None, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed,
                step_batch_size_schedule=step_batch_size_schedule, seq_length=seq_length)
        except (AssertionError, ValueError) as err:
            raise ValueError(str(err)) from None
        thresholds = sorted(threshold for threshold, _ in calculator.schedule)
        iteration = consumed = 0
        while True:
            calculator.update(consumed, False)
            batch = calculator.get_current_global_batch_size()
            if not steps or steps[-1][2] != batch:
                steps.append((iteration, consumed, batch, calculator.get()))
            later = [t for t in thresholds if t > consumed]
            if not later:
                return steps
            jump = -(-(later[0] - consumed) // batch)  # iterations until the next threshold
            iteration, consumed = iteration + jump, consumed + jump * batch
    if rampup_batch_size:
        for iteration, (consumed, batch, m) in enumerate(ramp_iterations(
                rampup_batch_size, int(global_batch_size or 0), micro_batch_size,
                data_parallel_size, decrease_batch_size_if_needed)):
            if not steps or steps[-1][2] != batch:
                steps.append((iteration, consumed, batch, m))
    return steps
