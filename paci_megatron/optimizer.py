"""Per-stage optimizer wrapper: the stage's own update after ``a`` backward micro-batches.

:class:`PACIOptimizer` wraps what megatron-core's ``get_megatron_optimizer`` returns. The
PACI schedule calls :meth:`PACIOptimizer.local_update` after every ``a``-th backward of
the stage; it then, with no collective that spans pipeline stages (docs/design.md, "The
local update"):

1. finishes the data-parallel grad reduction of the stage's own parameters
   (``DistributedDataParallel.finish_grad_sync``: DP all-reduce, or reduce-scatter with
   the distributed optimizer) and the TP all-reduce of TP-replicated grads;
2. sets the learning rate and weight decay of update ``k`` from Megatron's
   ``OptimizerParamScheduler`` at the sample count where the window started, which is
   what synchronous Megatron uses for iteration ``k`` when ``a = m``
   (``train_step``: ``optimizer.step()`` runs before ``opt_param_scheduler.step``);
3. steps the inner optimizer with grad norm, clipping and found-inf reduced over the
   stage's TP group (TP x DP x CP with the distributed optimizer) only;
4. zeroes the stage's grad buffers.

The training loop's own ``optimizer.step()``, ``optimizer.zero_grad()`` and
``model_chunk.zero_grad_buffer()`` neither step again nor wipe a partly accumulated window.

In-place updates and in-flight autograd graphs: parameters that in-flight graphs saved
are updated in place, which bumps their autograd version counter and would make the
next backward fail with "modified by an inplace operation". The wrapper records every
parameter's version before the step and restores it afterwards (stock PyTorch's
``_unsafe_set_version_counter``, see :mod:`paci_megatron.compat`), so in-flight backwards
run on the CURRENT (updated) weights, as PACI specifies; no copies are kept.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from . import compat

__all__ = ["PACIOptimizer", "NonFiniteGradientError", "finalize_stage_grads"]


def finalize_stage_grads(model: Sequence[torch.nn.Module], num_tokens=None, **unused) -> None:
    """The stage-local ``finalize_model_grads``: what of it PACI runs at a local update.

    Megatron's ``megatron.core.distributed.finalize_model_grads`` also all-reduces the
    tied word-embedding grads between the first and last stage, conditional-embedder
    grads over the pipeline group and the per-token-loss token count over the pipeline
    group; none of that may run under PACI (docs/design.md, "What stays stage-local").
    This keeps only ``finish_grad_sync()`` of every chunk (DP all-reduce, or
    reduce-scatter with the distributed optimizer) and the TP all-reduce of grads that
    are replicated across TP ranks. Same call signature as Megatron's, so it can stand in
    for ``config.finalize_model_grads_func``.

    Args:
        model: the stage's model chunks (megatron-core ``DistributedDataParallel``).
        num_tokens: must be None: a per-token loss normalisation crosses stages.

    Raises:
        ValueError: ``num_tokens`` was given (``--calculate-per-token-loss``).
    """
    if num_tokens is not None:
        raise ValueError(
            "a per-token loss needs the token count of the last stage on every stage: "
            "remove --calculate-per-token-loss with PACI"
        )
    model = list(model)
    for chunk in model:
        chunk.finish_grad_sync()
    compat.allreduce_stage_local_grads(model, compat.get_model_config(model[0]))


class NonFiniteGradientError(FloatingPointError):
    """A stage's accumulated gradients hold NaN or Inf at a local update."""


class PACIOptimizer:
    """Stage-local optimizer for PACI around a megatron-core optimizer.

    Args:
        optimizer: the optimizer ``get_megatron_optimizer(config, model)`` returned
            (a ``ChainedOptimizer`` or a single ``MegatronOptimizer``).
        model: the stage's model chunks (megatron-core ``DistributedDataParallel``).
        opt_param_scheduler: Megatron's ``OptimizerParamScheduler`` (optional); when
            given, update ``k`` uses its learning rate / weight decay at the sample count
            where the window of update ``k`` began: ``S0 + (k - 1 - v0) * a * mbs * DP``,
            with ``S0`` the scheduler's count and ``v0`` the version when the schedule
            first ran (0 and 0 for a fresh run; a loaded scheduler resumes the same way).
            The training loop keeps stepping the scheduler as Megatron does.
        distributed_optimizer: True if ``optimizer`` is Megatron's distributed optimizer
            (its grad stats are then reduced over the stage's TP x DP x CP group).
        skip_nonfinite_updates: when a window's gradients hold NaN/Inf, skip that update
            (and say so) instead of raising :class:`NonFiniteGradientError`.

    Attributes:
        version: updates applied by this stage (``v_s``).
        samples_per_microbatch: micro batch size x DP size, in samples; set by the
            schedule on its first call (needed for learning rates per update).
        last_grad_norm: the stage-local grad norm of the last update (None before).
        last_num_zeros: zeros in the grads of the last update (None unless logged).
        last_update_successful: False if the last update found inf/NaN and was skipped.
    """

    def __init__(
        self,
        optimizer,
        model: Sequence[torch.nn.Module],
        opt_param_scheduler=None,
        distributed_optimizer: Optional[bool] = None,
        skip_nonfinite_updates: bool = False,
    ):
        self.optimizer = optimizer
        self.model = list(model)
        self.opt_param_scheduler = opt_param_scheduler
        self.version = 0
        self.samples_per_microbatch: Optional[int] = None
        self.accumulation: Optional[int] = None
        self.num_microbatches: Optional[int] = None  # per iteration, set by the schedule
        self.skip_nonfinite_updates = skip_nonfinite_updates
        self.skipped_updates: List[int] = []
        self.last_grad_norm: Optional[float] = None
        self.last_num_zeros: Optional[float] = None
        self.last_update_successful = True
        self.last_lr: Optional[float] = None
        self.update_log: List[Tuple[int, Optional[float], Optional[float]]] = []
        if distributed_optimizer is None:
            distributed_optimizer = any(
                type(o).__name__ == "DistributedOptimizer" for o in compat.inner_optimizers(optimizer)
            )
        self.distributed_optimizer = distributed_optimizer
        group = compat.stage_grad_stats_group(distributed_optimizer)
        for inner in compat.inner_optimizers(optimizer):
            inner.grad_stats_parallel_group = group
        self._zero_grad_buffers: List[Callable[[], None]] = []
        for chunk in self.model:
            original = chunk.zero_grad_buffer
            self._zero_grad_buffers.append(original)
            chunk.zero_grad_buffer = self._guarded_zero_grad_buffer(original)
        self._pending = 0
        # (scheduler sample count, version) when the schedule first ran: windows are
        # counted from there, so a resumed run continues the LR schedule where it stopped
        self._lr_origin: Optional[Tuple[int, int]] = None

    # -- called by the schedule ---------------------------------------------------------
    def begin_call(self) -> None:
        """Called by the schedule at the start of each training call (drained or not)."""
        if self._lr_origin is None and self.opt_param_scheduler is not None:
            self._lr_origin = (int(self.opt_param_scheduler.num_steps), self.version)

    def restore_version(self, version: int) -> None:
        """Set the stage's version after loading a checkpoint (before the next call)."""
        self.version = int(version)
        self._pending = 0
        self._lr_origin = None

    def note_backward(self) -> None:
        """Count one backward micro-batch into the current accumulation window."""
        self._pending += 1

    @property
    def pending(self) -> int:
        """Backward micro-batches accumulated since the last update."""
        return self._pending

    def local_update(self, update_index: int) -> bool:
        """Apply this stage's update number ``update_index`` (1-based). See module doc.

        Returns:
            True if the step was applied, False if it was skipped (non-finite gradients
            with ``skip_nonfinite_updates``, or the inner optimizer found inf/NaN).

        Raises:
            NonFiniteGradientError: the window's gradients hold NaN/Inf on this stage (or
                on a DP/TP peer of it); names the stage, update, micro-batches, iteration.
            RuntimeError: ``update_index`` is not ``version + 1`` (the schedule and the
                optimizer disagree about the stage's version).
        """
        if update_index != self.version + 1:
            raise RuntimeError(
                f"update {update_index} requested but the stage has applied {self.version} "
                "updates: the schedule and the optimizer are out of step"
            )
        finalize_stage_grads(self.model)
        if self._nonfinite_grads():
            message = self._nonfinite_message(update_index)
            if not self.skip_nonfinite_updates:
                raise NonFiniteGradientError(
                    message + "; the update was not applied. Lower the learning rate or "
                    "skip such updates with --paci-skip-nonfinite-updates "
                    "(PACIOptimizer(skip_nonfinite_updates=True))"
                )
            warnings.warn(message + ": update skipped", RuntimeWarning, stacklevel=2)
            self._zero()
            self.version, self._pending = update_index, 0
            self.skipped_updates.append(update_index)
            self.last_update_successful = False
            self.last_grad_norm = self.last_num_zeros = None  # no update, no norm
            return False
        self._set_schedule_values(update_index)
        params = [p for chunk in self.model for p in chunk.parameters()]
        versions = [p._version for p in params]
        try:
            ok, grad_norm, num_zeros = self.optimizer.step()
        finally:
            compat.set_version_counters(params, versions)
        self._zero()
        self.version = update_index
        self._pending = 0
        self.last_update_successful = bool(ok)
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        self.last_num_zeros = None if num_zeros is None else float(num_zeros)
        self.update_log.append((update_index, self.last_lr, self.last_grad_norm))
        return bool(ok)

    def _nonfinite_grads(self) -> bool:
        """NaN/Inf anywhere in this stage's grad buffers, agreed over its TP x DP x CP group."""
        bad = any(
            not bool(torch.isfinite(buf.grad_data).all())
            for chunk in self.model
            for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))
        )
        if not torch.distributed.is_initialized():
            return bad
        flag = torch.tensor([1.0 if bad else 0.0],
                            device="cuda" if torch.cuda.is_available() else None)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                     group=compat.stage_grad_stats_group(True))
        return flag.item() > 0

    def _nonfinite_message(self, update_index: int) -> str:
        from megatron.core import parallel_state as ps

        where = f"stage {ps.get_pipeline_model_parallel_rank()}"
        if self.accumulation is None:
            return f"{where}: NaN/Inf in the gradients of update {update_index}"
        first = (update_index - 1) * self.accumulation
        last = first + self.accumulation - 1
        text = f"{where}: NaN/Inf in the gradients of update {update_index} (micro-batches {first}..{last}"
        if self.num_microbatches:
            text += f", iteration {first // self.num_microbatches + 1}"
            if last // self.num_microbatches != first // self.num_microbatches:
                text += f"..{last // self.num_microbatches + 1}"
        return text + ")"

    def _zero(self) -> None:
        for zero in self._zero_grad_buffers:
            zero()
        self.optimizer.zero_grad()

    def _set_schedule_values(self, update_index: int) -> None:
        sched = self.opt_param_scheduler
        if sched is None:
            groups = self.optimizer.param_groups
            self.last_lr = groups[0]["lr"] if groups else None
            return
        if self.samples_per_microbatch is None or self.accumulation is None or self._lr_origin is None:
            raise RuntimeError("the PACI schedule must run before a local update")
        samples0, version0 = self._lr_origin
        saved = sched.num_steps
        sched.num_steps = samples0 + (
            (update_index - 1 - version0) * self.accumulation * self.samples_per_microbatch
        )
        try:
            # the scheduler's own assignment of lr / weight decay to every param group, at
            # that sample count (its formula differs between megatron-core releases)
            sched.step(increment=0)
        finally:
            sched.num_steps = saved
        groups = self.optimizer.param_groups
        self.last_lr = groups[0]["lr"] if groups else None

    def _guarded_zero_grad_buffer(self, original: Callable[[], None]) -> Callable[[], None]:
        def zero_grad_buffer() -> None:
            # A training loop zeroes grad buffers at every iteration start; under PACI a
            # window spans iterations, so keep a partly accumulated window.
            if self._pending == 0:
                original()

        return zero_grad_buffer

    # -- called by a Megatron training loop ----------------------------------------------
    def step(self) -> Tuple[bool, Optional[float], Optional[float]]:
        """What Megatron's ``train_step`` calls after ``forward_backward_func``.

        Does not step: the stage's updates happen inside the schedule. Returns
        ``(update_successful, grad_norm, num_zeros_in_grad)`` of the stage's last update.
        """
        return self.last_update_successful, self.last_grad_norm, self.last_num_zeros

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op while a window is partly accumulated; the update zeroes grads itself."""
        if self._pending == 0:
            self.optimizer.zero_grad(set_to_none)

    def __getattr__(self, name: str) -> Any:
        # Everything else (param_groups, state_dict, sharded_state_dict, get_loss_scale,
        # scale_loss, reload_model_params, ...) is the inner optimizer's.
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)
