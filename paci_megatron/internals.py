"""The megatron-core optimizer internals PACI reaches into: the optimizers inside a
``ChainedOptimizer``, the main (fp32) parameters Megatron's mixed-precision and distributed
optimizers step and their data-parallel shards, one optimizer step on one parameter (a tied
embedding's copy), and the stage's process group for grad statistics.

Stable from megatron-core 0.14 on (the attributes are read by name; version differences
live in :mod:`paci_megatron.compat`).
"""

from __future__ import annotations

import weakref
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["inner_optimizers", "main_parameters", "main_parameter", "holds_main_parameter",
           "main_shard", "step_hyperparameters", "step_one_parameter", "distributed_optimizer_of",
           "shard_spans", "gather_parameter", "ParamGroupsWithout", "publish_main_parameters",
           "stage_grad_stats_group", "overlaps_param_gather", "start_param_gather",
           "finish_param_gather", "param_gather_pending", "regather"]


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
    stage-local all-gather its own step makes (``start_param_sync``), or, with
    ``overlap_param_gather``, through :func:`start_param_gather`. Every inner optimizer
    copies first (MoE: the dense and the expert optimizer share the model chunks), then
    each set of chunks is gathered once."""
    distributed = []
    for inner in inner_optimizers(optimizer):
        copy = getattr(inner, "_copy_main_params_to_model_params", None)
        if copy is not None:
            copy()
        if type(inner).__name__ == "DistributedOptimizer":
            distributed.append(inner)
    seen = set()
    for inner in distributed:
        chunks = list(inner.model_chunks)
        if any(id(c) in seen for c in chunks):
            continue
        seen.update(id(c) for c in chunks)
        if overlaps_param_gather(chunks):
            regather(chunks)
        else:
            for chunk in chunks:
                chunk.start_param_sync()


# -- the distributed optimizer's parameter all-gather with --overlap-param-gather ----------
# megatron-core's DistributedDataParallel (``overlap_param_gather``) leaves the all-gather
# of updated parameter shards to forward pre-hooks: the first hook of a bucket group
# dispatches its gather (``param_gather_dispatched``) and waits for it
# (``param_gather_handle``), then dispatches the next group (``next_param_gather_bucket_group``).
# ``finish_grad_sync`` marks every group as not gathered. Under PACI a local update happens
# inside the schedule, where the next action may also be a backward (which reads the
# weights without a forward hook) or the tied embedding's catch-up; these helpers keep
# megatron-core's own hooks doing the waiting in forwards and wait everywhere else.
# Groups whose shards changed since their last gather (an applied update) are kept in
# ``_GATHER_DUE``: a group not dispatched for another reason (the start of a run, a skipped
# update) holds the same values on every replica and is not gathered again here.
_GATHER_DUE: "weakref.WeakSet" = weakref.WeakSet()


def _overlapping(chunk) -> bool:
    ddp = getattr(chunk, "ddp_config", None)
    return bool(getattr(ddp, "overlap_param_gather", False)
                and getattr(ddp, "use_distributed_optimizer", False)
                and not getattr(ddp, "use_megatron_fsdp", False))


def _gather_chains(chunk) -> List[List[Any]]:
    """The chunk's bucket groups, dense and expert-parallel: each list one gather chain."""
    return [list(getattr(chunk, "bucket_groups", [])),
            list(getattr(chunk, "expert_parallel_bucket_groups", []))]


def _bucket_groups(chunk) -> List[Any]:
    return [g for chain in _gather_chains(chunk) for g in chain]


def overlaps_param_gather(chunks: Sequence[Any]) -> bool:
    """Whether any of ``chunks`` (megatron-core ``DistributedDataParallel``) gathers its
    distributed-optimizer parameters in forward pre-hooks (``--overlap-param-gather``)."""
    return any(_overlapping(c) for c in chunks)


def _hooks_enabled(chunk) -> bool:
    """megatron-core's forward pre-hooks are registered (Megatron-LM's training loop removes
    them for its first iteration, ``disable_forward_pre_hook(param_sync=False)``)."""
    return bool(getattr(chunk, "remove_forward_pre_hook_handles", None))


def start_param_gather(chunks: Sequence[Any]) -> None:
    """After a local update with ``overlap_param_gather``: start the all-gather of the
    updated shards over the stage's DP group. With the forward pre-hooks registered, the
    first bucket group of each gather chain (the one the next forward reaches first) is
    dispatched now, asynchronously, and the hooks wait for it and dispatch the rest,
    bucket by bucket, as megatron-core does after its own step
    (``DistributedDataParallel._make_forward_pre_hook``); with ``align_param_gather``
    (where the hooks dispatch nothing) every group is dispatched now. With the hooks removed, nothing
    would wait: the gather is made synchronously (``start_param_sync(force_sync=True)``).
    A group already dispatched is left as it is (see :func:`regather`). Chunks without
    ``overlap_param_gather`` are left alone (their optimizer's step gathered
    synchronously)."""
    for chunk in chunks:
        if not _overlapping(chunk):
            continue
        groups_of_chunk = _bucket_groups(chunk)
        for group in groups_of_chunk:
            if not group.param_gather_dispatched:
                _GATHER_DUE.add(group)
        if not _hooks_enabled(chunk):
            if any(not g.param_gather_dispatched for g in groups_of_chunk):
                chunk.start_param_sync(force_sync=True)  # not again where just gathered
            for group in groups_of_chunk:
                _GATHER_DUE.discard(group)
            continue
        # align_param_gather: the hooks dispatch nothing (Megatron's schedule would start
        # every gather through config.param_sync_func): start them all
        everything = bool(getattr(chunk.ddp_config, "align_param_gather", False))
        for groups in _gather_chains(chunk):
            followers = {id(g.next_param_gather_bucket_group) for g in groups
                         if getattr(g, "next_param_gather_bucket_group", None) is not None}
            for group in groups:
                if ((everything or id(group) not in followers)
                        and not group.param_gather_dispatched):
                    group.start_param_sync()


def regather(chunks: Sequence[Any]) -> None:
    """The model's shards changed again after a gather may have started (the look-ahead's
    weights, a drain's settling): wait for gathers in flight, then gather every group
    anew (:func:`start_param_gather`)."""
    for chunk in chunks:
        if not _overlapping(chunk):
            continue
        for group in _bucket_groups(chunk):
            if group.param_gather_handle is not None:
                group.finish_param_sync(skip_next_bucket_dispatch=True)
            group.param_gather_dispatched = False
    start_param_gather(chunks)


def param_gather_pending(chunks: Sequence[Any], params: Optional[Sequence[Any]] = None
                         ) -> List[Any]:
    """The bucket groups of ``chunks`` (only those holding ``params``, if given) whose
    parameters are not gathered yet: their shards changed and their gather was not
    dispatched since, or was and was not waited for."""
    pending = []
    for chunk in chunks:
        if not _overlapping(chunk):
            continue
        groups = _bucket_groups(chunk)
        if params is not None:
            owner = getattr(chunk, "param_to_bucket_group", {})
            wanted = {id(owner[p]) for p in params if p in owner}
            groups = [g for g in groups if id(g) in wanted]
        for g in groups:
            if g.param_gather_handle is not None or (not g.param_gather_dispatched
                                                     and g in _GATHER_DUE):
                pending.append(g)
            elif g.param_gather_dispatched:
                _GATHER_DUE.discard(g)  # gathered by a forward pre-hook
    return pending


def finish_param_gather(chunks: Sequence[Any], params: Optional[Sequence[Any]] = None) -> None:
    """Wait until every parameter of ``chunks`` holds its gathered value: before a backward
    (which reads the weights without a forward pre-hook), the tied embedding's catch-up
    and a drain's end. Dispatches a group's gather where none was; a no-op without
    ``overlap_param_gather`` or with nothing pending. No host sync: on NCCL a wait orders
    the current stream after the gather."""
    for group in param_gather_pending(chunks, params):
        group.finish_param_sync(skip_next_bucket_dispatch=True)
        _GATHER_DUE.discard(group)


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
