"""Per-stage optimizer wrapper: the stage's own update after ``a`` backward micro-batches.

:class:`PACIOptimizer` wraps what megatron-core's ``get_megatron_optimizer`` returns. The
PACI schedule calls :meth:`PACIOptimizer.local_update` with the :class:`Window` each
``a``-th backward closes; with no collective that spans pipeline stages it finishes the
stage's DP (and TP-replicated) grad reduction, sets the learning rate of the window's
first sample from Megatron's ``OptimizerParamScheduler``, steps the inner optimizer with
grad norm, clipping and found-inf reduced over the stage only, and zeroes the grads
(docs/design.md, "The local update"). The training loop's own ``optimizer.step()`` and
``zero_grad()`` neither step again nor wipe a partly accumulated window.

Parameters that in-flight autograd graphs saved are updated in place; the wrapper
restores their autograd version counters after the step (stock PyTorch's
``_unsafe_set_version_counter``, :mod:`paci_megatron.compat`), so in-flight backwards run
on the CURRENT weights, as PACI specifies, with no copies (docs/design.md, "Weights seen
by a backward").
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from . import compat, internals

__all__ = ["PACIOptimizer", "Window", "NonFiniteGradientError", "finalize_stage_grads",
           "scale_by_token_count"]


def finalize_stage_grads(model: Sequence[torch.nn.Module], num_tokens=None, **unused) -> None:
    """The stage-local ``finalize_model_grads``: what of it PACI runs at a local update.

    Megatron's ``megatron.core.distributed.finalize_model_grads`` also all-reduces the
    tied word-embedding grads between the first and last stage, conditional-embedder
    grads over the pipeline group and broadcasts the per-token-loss token count from the
    last stage; none of that may run under PACI (docs/design.md, "What stays
    stage-local"); the tied embedding's gradients are exchanged by
    :mod:`paci_megatron.tied` instead, and the token count reaches every stage with the
    gradients (:class:`~paci_megatron.schedule.PACISchedule`). This keeps
    ``finish_grad_sync()`` of every chunk (DP all-reduce, or reduce-scatter with the
    distributed optimizer), :func:`compat.finalize_stage_local` (TP all-reduce of
    replicated grads, MoE router updates) and, given ``num_tokens``,
    :func:`scale_by_token_count`. Same call signature as Megatron's, so it can stand in
    for ``config.finalize_model_grads_func``.

    Args:
        model: the stage's model chunks (megatron-core ``DistributedDataParallel``).
        num_tokens: ``--calculate-per-token-loss``: this rank's token count of the
            accumulated micro-batches, a 0-dim int tensor on the grads' device (summed
            over the DP x CP group in place), or None.
    """
    model = list(model)
    for chunk in model:
        chunk.finish_grad_sync()
    compat.finalize_stage_local(model, compat.get_model_config(model[0]))
    if num_tokens is not None:
        scale_by_token_count(model, num_tokens)


def scale_by_token_count(model: Sequence[torch.nn.Module], num_tokens: torch.Tensor) -> None:
    """``--calculate-per-token-loss``: sum ``num_tokens`` over the stage's DP x CP group (in
    place) and scale every gradient by ``1 / num_tokens`` (by 1 where it is 0): the last
    step of Megatron's ``finalize_model_grads``, with the count of a window instead of an
    iteration. No host sync (Megatron tests ``num_tokens > 0`` on the host; a clamp to 1
    gives the same bits: 0 tokens means no scaling).

    Args:
        model: the stage's model chunks (megatron-core ``DistributedDataParallel``).
        num_tokens: 0-dim int tensor, on the grads' device.
    """
    if torch.distributed.is_initialized():
        from megatron.core import parallel_state as ps

        torch.distributed.all_reduce(num_tokens,
                                     group=ps.get_data_parallel_group(with_context_parallel=True))
    scaling = 1.0 / torch.clamp(num_tokens, min=1)
    for chunk in model:
        chunk.scale_gradients(scaling)


def _tied_embedding(model: Sequence[torch.nn.Module], optimizer):
    """The stage's :class:`~paci_megatron.tied.TiedEmbedding` (None without a tied weight
    duplicated across stages).

    Raises:
        PACIConfigError: the optimizer keeps main parameters outside its param groups
            (``use_precision_aware_optimizer``).
    """
    if not torch.distributed.is_initialized():
        return None
    from .tied import TiedEmbedding, find_tied_embedding

    found = find_tied_embedding(model)
    if found is None:
        return None
    if any(getattr(getattr(o, "config", None), "use_precision_aware_optimizer", False)
           for o in internals.inner_optimizers(optimizer)):
        from .config import TIED_PRECISION_AWARE, PACIConfigError

        raise PACIConfigError([TIED_PRECISION_AWARE])
    from megatron.core import parallel_state as ps

    tied = TiedEmbedding(found[0], found[1], ps.get_pipeline_model_parallel_world_size(),
                         ps.get_embedding_group())
    tied.handshake(optimizer)  # both ends construct their wrapper at the same point
    return tied


class NonFiniteGradientError(FloatingPointError):
    """A stage's accumulated gradients hold NaN or Inf at a local update."""


@dataclass(frozen=True)
class Window:
    """The accumulation window a local update closes (given by the schedule).

    Attributes:
        update: ``k``, the stage's update number (1-based).
        first_microbatch: the window's first micro-batch; ``size``: its backwards (``a``,
            fewer for a drain's last window).
        samples_per_microbatch: micro batch size x DP, in samples.
        num_microbatches: ``m``; ``stage``: the pipeline stage (both for messages).
        mean_drift: the stage's ``(P-1-s)/a`` (:func:`paci_megatron.plan.mean_drift`) with
            micro-batches in flight, 0 when the update ends a drain (scales the look-ahead).
        num_tokens: (``--calculate-per-token-loss``) the token count of the window's
            micro-batches on this rank, a 0-dim int tensor; None otherwise.
    """

    update: int
    first_microbatch: int
    size: int
    samples_per_microbatch: int
    num_microbatches: int
    stage: int = 0
    mean_drift: float = 0.0
    num_tokens: Optional[torch.Tensor] = None

    def describe(self) -> str:
        """``"update 3 (micro-batches 16..23, iteration 3)"``."""
        last = self.first_microbatch + self.size - 1
        text = f"update {self.update} (micro-batches {self.first_microbatch}..{last}"
        if self.num_microbatches:
            first_it = self.first_microbatch // self.num_microbatches + 1
            last_it = last // self.num_microbatches + 1
            text += f", iteration {first_it}" + (f"..{last_it}" if last_it != first_it else "")
        return text + ")"


class PACIOptimizer:
    """Stage-local optimizer for PACI around a megatron-core optimizer.

    Args:
        optimizer: the optimizer ``get_megatron_optimizer(config, model)`` returned
            (a ``ChainedOptimizer`` or a single ``MegatronOptimizer``).
        model: the stage's model chunks (megatron-core ``DistributedDataParallel``).
        opt_param_scheduler: Megatron's ``OptimizerParamScheduler`` (optional): update
            ``k`` uses its values at the sample where its window began,
            ``S0 + (j_k - j0) * mbs * DP`` (``j_k``: the window's first micro-batch;
            ``(S0, j0)``: the scheduler's count and the stage's backwards at the first call).
        distributed_optimizer: True if ``optimizer`` is Megatron's distributed optimizer
            (its grad stats are then reduced over the stage's TP x DP x CP group).
        skip_nonfinite_updates: when a window's gradients hold NaN/Inf, skip that update
            (and say so) instead of raising :class:`NonFiniteGradientError`; more than
            ``max_consecutive_skips`` skips in a row raise it (the run has diverged).
        lookahead: the look-ahead's scale ``c`` (0: off): with ``x`` the inner optimizer's
            iterate and ``d`` its last update, the weights are ``x + c * mean_drift * d``
            (docs/design.md, "Staleness mitigations"); one fp32 buffer per parameter. A
            tied embedding's weight does not look ahead (its two copies stay equal).
            :meth:`settle` (every drain) returns them to ``x`` and forgets ``d``.

    Attributes:
        tied: the stage's :class:`~paci_megatron.tied.TiedEmbedding` when the model ties its
            input embedding and output layer across stages (found in ``model``), else None.
        version: updates applied by this stage (``v_s``), read from the schedule's
            :class:`~paci_megatron.plan.StageState` (0 before a schedule is attached).
        last_grad_norm: the stage-local grad norm of the last update (None before).
        last_num_zeros: zeros in the grads of the last update (None unless logged).
        last_update_successful: False if the last update found inf/NaN and was skipped.
        update_log: ``(update, lr, grad norm)`` of every applied update.
        skipped_updates: the update numbers skipped for non-finite gradients.

    Raises:
        PACIConfigError: the model ties its embeddings across stages and the optimizer keeps
            main parameters outside its param groups (``use_precision_aware_optimizer``), or
            the two ends' tied weights differ; or the optimizer's config sets
            ``overlap_param_gather_with_optimizer_step`` (the gather would race PACI's
            writes to the weights).
        PACICommunicationError: (tied embeddings) the other end did not answer the handshake.
    """

    def __init__(
        self,
        optimizer,
        model: Sequence[torch.nn.Module],
        opt_param_scheduler=None,
        distributed_optimizer: Optional[bool] = None,
        skip_nonfinite_updates: bool = False,
        lookahead: float = 0.0,
        max_consecutive_skips: int = 10,
    ):
        self.optimizer = optimizer
        self.max_consecutive_skips = max_consecutive_skips
        self.lookahead = float(lookahead)
        self._delta: Optional[List[torch.Tensor]] = None  # the last update d (look-ahead)
        self._ahead = 0.0  # the g that the weights are ahead by now
        self.model = list(model)
        self.opt_param_scheduler = opt_param_scheduler
        self.skip_nonfinite_updates = skip_nonfinite_updates
        self.skipped_updates: List[int] = []
        self.last_grad_norm: Optional[float] = None
        self.last_num_zeros: Optional[float] = None
        self.last_update_successful = True
        self.last_lr: Optional[float] = None
        #: (``--calculate-per-token-loss``) the last update's token count, summed over the
        #: stage's DP x CP group: a 0-dim int tensor (read it, not the schedule, to sync)
        self.last_num_tokens: Optional[torch.Tensor] = None
        self.update_log: List[Tuple[int, Optional[float], Optional[float]]] = []
        if distributed_optimizer is None:
            distributed_optimizer = any(type(o).__name__ == "DistributedOptimizer"
                                        for o in internals.inner_optimizers(optimizer))
        self.distributed_optimizer = distributed_optimizer
        if any(getattr(getattr(o, "config", None), "overlap_param_gather_with_optimizer_step",
                       False) for o in internals.inner_optimizers(optimizer)):
            from .config import OVERLAP_WITH_STEP, PACIConfigError

            raise PACIConfigError([f"overlap_param_gather_with_optimizer_step {OVERLAP_WITH_STEP}: "
                                   "set it to False in the OptimizerConfig"])
        group = internals.stage_grad_stats_group(distributed_optimizer)
        for inner in internals.inner_optimizers(optimizer):
            inner.grad_stats_parallel_group = group
            # Megatron's optimizer timers (--timing-log-level >= 1) start with a world
            # barrier; inside a local update it would wait for stages that update later
            if getattr(getattr(inner, "config", None), "barrier_with_L1_time", False):
                inner.config.barrier_with_L1_time = False
        # the chunks' own zero_grad_buffer (the schedule guards the attribute afterwards)
        self._zero_grad_buffers: List[Callable[[], None]] = [c.zero_grad_buffer for c in self.model]
        self._stage_state: Optional[Callable[[], Any]] = None
        # (scheduler sample count, backwarded micro-batches) when the schedule first ran:
        # windows are counted from there, so a resumed run continues the LR schedule
        self._lr_origin: Optional[Tuple[int, int]] = None
        self.tied = _tied_embedding(self.model, self.optimizer)
        #: the distributed optimizer's all-gather runs in forward pre-hooks
        #: (``--overlap-param-gather``): started after each update, waited where no hook waits
        self.overlap_param_gather = internals.overlaps_param_gather(self.model)

    @property
    def version(self) -> int:
        """Updates applied by this stage (the schedule's record; 0 without one)."""
        return self._stage_state().version if self._stage_state is not None else 0

    # -- called by the schedule ---------------------------------------------------------
    def attach(self, stage_state: Callable[[], Any]) -> None:
        """Called once by the schedule: where the stage's version is recorded."""
        self._stage_state = stage_state

    def begin_call(self, backwarded: int) -> None:
        """Called at the start of each training call with the stage's backwarded
        micro-batches; the first call fixes the learning-rate origin."""
        if self._lr_origin is None and self.opt_param_scheduler is not None:
            self._lr_origin = (int(self.opt_param_scheduler.num_steps), int(backwarded))

    def local_update(self, window: Window) -> bool:
        """Apply this stage's update that closes ``window``. See module doc.

        Returns:
            True if the step was applied, False if it was skipped (non-finite gradients
            with ``skip_nonfinite_updates``, or the inner optimizer found inf/NaN).

        Raises:
            NonFiniteGradientError: the window's gradients hold NaN/Inf on this stage (or
                on a DP/TP peer of it); names the stage, update, micro-batches, iteration.
            PACICommunicationError: (tied embeddings) the other end's gradient did not come.
        """
        if self.overlap_param_gather:  # no gather may still read the shards the step writes
            internals.finish_param_gather(self.model)
        finalize_stage_grads(self.model)
        tied = self.tied
        if tied is not None and tied.first:
            tied.add_last_stage_grad(self.optimizer, window.update)  # main_grad = g0 + gL, as synchronously
        elif tied is not None:
            tied.hold_window_grad(self.optimizer, window.update)  # sent where the plan says
        if window.num_tokens is not None:  # after the tied sum, as Megatron scales g0 + gL
            scale_by_token_count(self.model, window.num_tokens)
            self.last_num_tokens = window.num_tokens
        if self._nonfinite_grads():
            message = f"stage {window.stage}: NaN/Inf in the gradients of {window.describe()}"
            if not self.skip_nonfinite_updates:
                raise NonFiniteGradientError(
                    message + "; the update was not applied. Lower the learning rate or "
                    "skip such updates with --paci-skip-nonfinite-updates "
                    "(PACIOptimizer(skip_nonfinite_updates=True))")
            self.skipped_updates.append(window.update)
            run = self.skipped_updates[-self.max_consecutive_skips - 1:]
            if len(run) > self.max_consecutive_skips and run[-1] - run[0] == len(run) - 1:
                raise NonFiniteGradientError(
                    f"{message}: {len(run)} consecutive updates of this stage had NaN/Inf "
                    "gradients and were skipped; the run has diverged: lower the learning rate")
            warnings.warn(message + ": update skipped", RuntimeWarning, stacklevel=2)
            if tied is not None and tied.first:
                tied.hold_step(self.optimizer, window.update, applied=False)
            self._zero()
            self.last_update_successful = False
            self.last_grad_norm = self.last_num_zeros = None  # no update, no norm
            return False
        self._set_schedule_values(window)
        params = [p for chunk in self.model for p in chunk.parameters()]
        versions = [p._version for p in params]
        try:
            ahead = self.lookahead * window.mean_drift
            if ahead or self._ahead:
                self._look_back()
            with (tied.excluded(self.optimizer) if tied is not None and not tied.first
                  else contextlib.nullcontext()):  # the last stage's copy: tied.catch_up
                ok, grad_norm, num_zeros = self.optimizer.step()
            if tied is not None and tied.first:
                tied.hold_step(self.optimizer, window.update, applied=bool(ok))
            if ahead:
                self._look_ahead(ahead)
            if self.overlap_param_gather:
                internals.start_param_gather(self.model)
        finally:
            compat.set_version_counters(params, versions)
        self._zero()
        self.last_update_successful = bool(ok)
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        self.last_num_zeros = None if num_zeros is None else float(num_zeros)
        self.update_log.append((window.update, self.last_lr, self.last_grad_norm))
        return bool(ok)

    def finish_param_gather(self, params: Optional[Sequence[torch.Tensor]] = None) -> None:
        """With ``--overlap-param-gather``: wait until the stage's weights (those of the
        bucket groups holding ``params``, if given) hold their gathered values
        (:func:`paci_megatron.internals.finish_param_gather`). The schedule calls it before
        each backward, the tied embedding's catch-up (the tied weight's groups) and at a
        drain's end; forwards are waited for by megatron-core's forward pre-hooks. A no-op
        otherwise."""
        if self.overlap_param_gather:
            internals.finish_param_gather(self.model, params)

    @torch.no_grad()
    def _look_back(self) -> None:
        """Weights from ``x + g d`` back to ``x``; ``d`` then holds ``x`` (the step's start)."""
        main = self._lookahead_parameters()
        if self._delta is None:
            self._delta = [torch.zeros_like(p, dtype=torch.float32) for p in main]
        for p, d in zip(main, self._delta):
            if self._ahead:
                p.sub_(d.to(p.dtype), alpha=self._ahead)
            d.copy_(p)
        self._ahead = 0.0

    @torch.no_grad()
    def _look_ahead(self, ahead: float) -> None:
        """After the step: ``d = x_new - x_old`` and the weights become ``x_new + g d``."""
        for p, d in zip(self._lookahead_parameters(), self._delta):
            d.sub_(p.float()).neg_()
            p.add_(d.to(p.dtype), alpha=ahead)
        self._ahead = ahead
        internals.publish_main_parameters(self.optimizer)

    def _lookahead_parameters(self) -> List[torch.Tensor]:
        """The main parameters that look ahead: all but a tied embedding's, whose two
        copies must stay the same bits (``x + g d - g d`` is not always ``x``)."""
        main = internals.main_parameters(self.optimizer)
        if self.tied is None or not internals.holds_main_parameter(self.optimizer, self.tied.weight):
            return main
        skip = internals.main_parameter(self.optimizer, self.tied.weight)
        return [p for p in main if p is not skip]

    def settle(self) -> None:
        """Called by the schedule after every drain: the weights return to the optimizer's
        iterate and the look-ahead forgets the last update (a no-op without look-ahead)."""
        if self._delta is None:
            return
        with torch.no_grad():
            for p, d in zip(self._lookahead_parameters(), self._delta):
                if self._ahead:
                    p.sub_(d.to(p.dtype), alpha=self._ahead)
                d.zero_()
        self._ahead = 0.0
        internals.publish_main_parameters(self.optimizer)

    def _nonfinite_grads(self) -> bool:
        """NaN/Inf anywhere in this stage's grad buffers, agreed over its TP x DP x CP group.
        One host sync per update: the flag is reduced on the device, read once. The check
        is PyTorch's fused ``_amp_foreach_non_finite_check_and_unscale_`` (what Megatron's
        fp16 optimizer and ``torch.amp`` use) with a scale of 1: it allocates nothing the
        size of a buffer (a per-buffer ``isfinite`` would materialise bool copies of every
        buffer, an out-of-memory spike on large stages) and leaves every value as it is."""
        bufs = [buf.grad_data for chunk in self.model for buf in
                list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))]
        device = bufs[0].device if bufs else ("cuda" if torch.cuda.is_available() else "cpu")
        flag = torch.zeros(1, device=device)
        one = torch.ones(1, device=device)
        by_dtype: dict = {}
        for data in bufs:
            by_dtype.setdefault(data.dtype, []).append(data)
        for tensors in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, one)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                         group=internals.stage_grad_stats_group(True))
        return flag.item() > 0

    def _zero(self) -> None:
        for zero in self._zero_grad_buffers:
            zero()
        self.optimizer.zero_grad()

    def _set_schedule_values(self, window: Window) -> None:
        sched = self.opt_param_scheduler
        if sched is None:
            groups = self.optimizer.param_groups
            self.last_lr = groups[0]["lr"] if groups else None
            return
        if self._lr_origin is None:
            raise RuntimeError("the PACI schedule must run before a local update")
        samples0, microbatch0 = self._lr_origin
        saved = sched.num_steps
        sched.num_steps = samples0 + (window.first_microbatch - microbatch0) * window.samples_per_microbatch
        try:
            # the scheduler's own assignment of lr / weight decay to every param group, at
            # that sample count (its formula differs between megatron-core releases)
            sched.step(increment=0)
        finally:
            sched.num_steps = saved
        groups = self.optimizer.param_groups
        self.last_lr = groups[0]["lr"] if groups else None

    # -- called by a Megatron training loop ----------------------------------------------
    def step(self) -> Tuple[bool, Optional[float], Optional[float]]:
        """What Megatron's ``train_step`` calls after ``forward_backward_func``.

        Does not step: the stage's updates happen inside the schedule. Returns
        ``(update_successful, grad_norm, num_zeros_in_grad)`` of the stage's last update.
        """
        return self.last_update_successful, self.last_grad_norm, self.last_num_zeros

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing: each local update zeroes the stage's gradients itself, and zeroing
        here, between two calls, would wipe a window that spans them."""

    def __getattr__(self, name: str) -> Any:
        # Everything else (param_groups, state_dict, sharded_state_dict, get_loss_scale,
        # scale_loss, reload_model_params, ...) is the inner optimizer's.
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)
