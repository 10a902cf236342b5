"""Every megatron-core / PyTorch version difference paci-megatron depends on, and nothing else.

Supported: megatron-core 0.14 .. 0.19 (0.16.1 in CI), PyTorch releases that have
``torch._C._autograd._unsafe_set_version_counter``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["MEGATRON_CORE_VERSION", "init_device_kwargs", "backward_step", "forward_step", "get_tensor_shapes",
           "get_model_config", "get_model_type", "set_version_counters", "inner_optimizers",
           "main_parameters", "publish_main_parameters", "get_megatron_muon_optimizer",
           "muon_module", "stage_grad_stats_group", "finalize_stage_local"]

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


MULTI_MODULE_REFUSAL = (
    "a multi-module process-group collection or communicator (megatron-core's "
    "MultiModuleProcessGroupCollection / MultiModulePipelineCommunicator: several modules, "
    "such as an encoder and a language model, on separate pipeline grids) is not supported: "
    "PACI's stages each hold one chunk of one model; use --pipeline-schedule 1f1b")


def refuse_multi_module(*objects: Any) -> None:
    """Raise :class:`PACIConfigError` if any object is a megatron-core multi-module process-group
    collection or communicator (0.16+), recognised by class name (older releases lack them)."""
    from .config import PACIConfigError

    if any(c.__name__.startswith("MultiModule") for o in objects for c in type(o).__mro__):
        raise PACIConfigError([MULTI_MODULE_REFUSAL])


def process_groups(pg_collection=None, p2p_communicator=None):
    """``(pp_group, tp_group, cp_group)`` of one call, as Megatron's 1F1B takes them.

    From ``pg_collection`` (a single-module ``ProcessGroupCollection``, megatron-core 0.14+)
    and ``p2p_communicator.pp_group`` where given, else from ``parallel_state``. The caller
    refuses multi-module ones first (:func:`refuse_multi_module`).
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


def inner_optimizers(optimizer) -> List[Any]:
    """The optimizers inside a ``ChainedOptimizer`` (or ``[optimizer]`` for a single one)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_parameters(optimizer) -> List[torch.Tensor]:
    """The tensors the inner optimizers step: the fp32 main parameters of Megatron's
    mixed-precision optimizers, the model parameters themselves for ``FP32Optimizer``."""
    return [p for inner in inner_optimizers(optimizer) for group in inner.optimizer.param_groups
            for p in group["params"]]


def main_parameter(optimizer, param: torch.Tensor) -> torch.Tensor:
    """The tensor Megatron's optimizer steps for model parameter ``param``: its fp32 main
    copy (``Float16OptimizerWithFloat16Params``), this data-parallel rank's shard of it
    (``DistributedOptimizer``: 1-D, :func:`main_shard` elements of ``param.view(-1)``), or
    ``param`` itself.

    Raises:
        ValueError: no inner optimizer holds ``param`` (with the distributed optimizer: this
            rank's shard holds none of it).
    """
    return _locate(optimizer, param)[1]


def holds_main_parameter(optimizer, param: torch.Tensor) -> bool:
    """Whether this rank's optimizer steps (a shard of) ``param``."""
    try:
        _locate(optimizer, param)
    except ValueError:
        return False
    return True


def main_shard(optimizer, param: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(start, end)``: the elements of ``param.view(-1)`` this data-parallel rank's
    distributed optimizer steps (``DistributedOptimizer._get_model_param_range_map``), or
    None where the main parameter is the whole tensor.

    Raises:
        ValueError: as :func:`main_parameter`.
    """
    return _locate(optimizer, param)[3]


#: (model parameters, main parameters) group attributes of Megatron's optimizers:
#: ``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer`` (bf16 and fp32 params)
_MAIN_GROUPS = (("float16_groups", "fp32_from_float16_groups"),
                ("model_float16_groups", "shard_fp32_from_float16_groups"),
                ("model_fp32_groups", "shard_fp32_groups"))


def _locate(optimizer, param: torch.Tensor):
    """``(torch optimizer, main parameter, its param group, shard)`` of a model parameter,
    ``shard`` as :func:`main_shard`."""
    for inner in inner_optimizers(optimizer):
        main = param
        for model_attr, main_attr in _MAIN_GROUPS:
            for model_group, main_group in zip(getattr(inner, model_attr, []),
                                               getattr(inner, main_attr, [])):
                main = next((q for p, q in zip(model_group, main_group) if p is param), main)
        for group in inner.optimizer.param_groups:
            if any(p is main for p in group["params"]):
                shard = None
                if main is not param and hasattr(inner, "_get_model_param_range_map"):
                    span = inner._get_model_param_range_map(param)["param"]
                    shard = (int(span.start), int(span.end))
                return inner.optimizer, main, group, shard
    raise ValueError(f"no optimizer holds the parameter of shape {tuple(param.shape)}")


def step_hyperparameters(optimizer, param: torch.Tensor) -> Tuple[float, float, int]:
    """``(lr, weight_decay, group step)`` of the param group holding ``param`` (as last set);
    the group step is the step count that fused Adams (Transformer Engine's and Apex's
    ``FusedAdam``) keep in the group, -1 where the group has none (torch's Adam keeps it per
    parameter)."""
    group = _locate(optimizer, param)[2]
    return float(group["lr"]), float(group["weight_decay"]), int(group.get("step", -1))


def step_one_parameter(optimizer, param: torch.Tensor, grad: torch.Tensor, lr: float,
                       weight_decay: float, group_step: int = -1) -> None:
    """One step of the inner optimizer on ``param`` alone, with gradient ``grad`` (fp32,
    the main parameter's shape), ``lr`` and ``weight_decay``; its state (Adam's moments and
    step count) is the parameter's own, except that an optimizer counting steps per group
    (fused Adam) takes step ``group_step`` (>= 1) for it, leaving the group's own count
    alone. The model copy is refreshed from the main one as Megatron's
    ``_copy_main_params_to_model_params`` does (with the distributed optimizer: this rank's
    shard only; :func:`gather_parameter` then rebuilds the whole tensor)."""
    torch_optimizer, main, group, shard = _locate(optimizer, param)
    saved = torch_optimizer.param_groups
    one = dict(group, params=[main], lr=lr, weight_decay=weight_decay)
    if group_step >= 1:
        one["step"] = group_step - 1  # fused Adam counts the step before using it
    torch_optimizer.param_groups = [one]
    main.grad = grad
    try:
        torch_optimizer.step()
    finally:
        torch_optimizer.param_groups = saved
        main.grad = None
    if shard is not None:
        param.detach().view(-1)[shard[0]:shard[1]].copy_(main.detach())
    elif main is not param:
        param.data.copy_(main.data)


def distributed_optimizer_of(optimizer, param: torch.Tensor):
    """The ``DistributedOptimizer`` inside ``optimizer`` whose buffers hold ``param`` (the
    dense one, not an expert one, for a dense parameter), or None."""
    for inner in inner_optimizers(optimizer):
        if type(inner).__name__ == "DistributedOptimizer" and any(
                param in getattr(buffer, "param_index_map", {})
                for buffer in getattr(inner, "buffers", [])):
            return inner
    return None


def shard_spans(optimizer, param: torch.Tensor) -> Optional[List[Tuple[int, int]]]:
    """Per rank of the distributed optimizer's ``data_parallel_group``: the ``(start, end)``
    elements of ``param.view(-1)`` it steps (a stage-local all-gather of two integers; call
    it on every rank of that group). None without a distributed optimizer."""
    inner = distributed_optimizer_of(optimizer, param)
    if inner is None:
        return None
    span = main_shard(optimizer, param) if holds_main_parameter(optimizer, param) else (0, 0)
    group = inner.data_parallel_group
    mine = torch.tensor(span, dtype=torch.int64, device=param.device)
    every = torch.empty(2 * dist.get_world_size(group), dtype=torch.int64, device=param.device)
    dist.all_gather_into_tensor(every, mine, group=group)
    return [tuple(pair) for pair in every.view(-1, 2).tolist()]


@torch.no_grad()
def gather_parameter(optimizer, param: torch.Tensor, spans: Sequence[Tuple[int, int]]) -> None:
    """With the distributed optimizer: rebuild the whole model parameter ``param`` on every
    data-parallel rank of this stage from the shards each rank stepped (``spans``, from
    :func:`shard_spans`), bit for bit: a stage-local all-gather over the optimizer's
    ``data_parallel_group`` of equal-sized chunks (the largest shard; ``param.numel()``
    elements of ``param.dtype`` in all, as Megatron's own bucket all-gather,
    ``start_param_sync``)."""
    inner = distributed_optimizer_of(optimizer, param)
    flat = param.detach().view(-1)
    size = max(end - start for start, end in spans)
    start, end = spans[dist.get_rank(inner.data_parallel_group)]
    chunk = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    chunk[:end - start] = flat[start:end]
    every = torch.empty(size * len(spans), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(every, chunk, group=inner.data_parallel_group)
    for r, (start, end) in enumerate(spans):
        flat[start:end] = every[r * size:r * size + end - start]


class ParamGroupsWithout:
    """Context: the inner optimizer's param groups without ``param`` (its main copy), so
    that a Megatron ``step()`` inside leaves it, its grad and its state alone. What the step
    writes into a group besides its parameters (a fused Adam's group step count) is kept."""

    def __init__(self, optimizer, param: torch.Tensor):
        self.torch_optimizer, self.main = _locate(optimizer, param)[:2]
        self.saved = None

    def __enter__(self):
        self.saved = self.torch_optimizer.param_groups
        self.torch_optimizer.param_groups = [
            dict(g, params=[p for p in g["params"] if p is not self.main]) for g in self.saved]
        return self

    def __exit__(self, *exc):
        for saved, used in zip(self.saved, self.torch_optimizer.param_groups):
            saved.update((k, v) for k, v in used.items() if k != "params")
        self.torch_optimizer.param_groups = self.saved


def publish_main_parameters(optimizer) -> None:
    """Copy changed main parameters into the model's (mixed precision; a no-op for fp32);
    the distributed optimizer's shards then reach every DP replica through the same
    stage-local all-gather its own step makes (``start_param_sync``)."""
    for inner in inner_optimizers(optimizer):
        copy = getattr(inner, "_copy_main_params_to_model_params", None)
        if copy is not None:
            copy()
        if type(inner).__name__ == "DistributedOptimizer":
            for chunk in inner.model_chunks:
                chunk.start_param_sync()


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


def stage_grad_stats_group(distributed_optimizer: bool):
    """Process group over which a stage reduces grad norm, zero count and found-inf.

    Megatron reduces over TP x PP (or the whole distributed-optimizer instance); PACI over
    the stage only: its TP group, or its TP x DP x CP group when grads are sharded
    (docs/design.md, "What stays stage-local, what is refused").
    """
    from megatron.core import parallel_state as ps

    if distributed_optimizer:
        return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return ps.get_tensor_model_parallel_group()


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
