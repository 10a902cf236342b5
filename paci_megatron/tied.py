"""Tied input embedding and output layer across stages, with no collective.

Megatron keeps the first stage's embedding ``E`` and the last stage's copy ``E'`` equal by
all-reducing their gradients over the embedding group in ``finalize_model_grads``
(``_allreduce_word_embedding_grads``), a synchronisation PACI must not have. Under PACI
(docs/design.md, "Tied embeddings"):

- the last stage, closing window ``k``, sends its gradient ``gL(k)`` to the first stage
  (a non-blocking send, posted before the gradient of micro-batch ``ka - 1`` leaves it) and
  steps everything but ``E'``;
- the first stage, at its update ``k``, adds ``gL(k)`` to its own ``g0(k)`` and steps ``E``
  with the sum, as synchronous training does; it then sends the gradient that step used
  (after its clipping) with the step's learning rate and weight decay;
- the last stage applies that same step to ``E'`` before its forward of micro-batch
  ``ka + P - 1`` (:func:`paci_megatron.plan.tied_updates_due`), the first of its actions
  that causally follows the first stage's update ``k``, and at the end of every drain.

With Megatron's distributed optimizer each data-parallel rank holds a shard of the tied
weight's main copy; megatron-core gives the tied weight a bucket of its own on both stages
(``_does_param_require_new_bucket``), so a rank's shard covers the same elements at both
ends. Each message then carries only that shard (the DP-reduced part of the gradient after
the reduce-scatter, and the shard's clipped gradient), and the last stage rebuilds ``E'``
on its data-parallel ranks after each tied update (:func:`paci_megatron.compat.gather_parameter`,
a stage-local collective).

Both copies pass through the identical sequence of optimizer steps; ``E'`` lags the last
stage's own version by at most ``ceil((P - 1) / a)`` updates (the "tied lag", recorded by
:class:`~paci_megatron.telemetry.DriftTelemetry`), and every micro-batch meets the same
version of the tied weight at both ends of the pipeline.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import compat
from .p2p import PipelineTimeout, Watchdog, wait_all

__all__ = ["TiedEmbedding", "find_tied_embedding"]

_UNSET = object()


def find_tied_embedding(model) -> Optional[Tuple[torch.nn.Parameter, bool]]:
    """``(weight, on_first_stage)`` of a stage whose tied embedding / output weight is
    duplicated on another pipeline stage; None where there is none (untied, one stage, or a
    middle stage). ``model``: the stage's model chunks (megatron-core DDP-wrapped)."""
    from megatron.core.utils import get_attr_wrapped_model

    for chunk in model:
        try:
            module = get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)
        except RuntimeError:  # not a language model (no pre_process anywhere inside)
            continue
        if not getattr(module, "share_embeddings_and_output_weights", False):
            continue
        if module.pre_process and module.post_process:
            return None  # one stage holds both ends: the weight is one tensor
        if module.pre_process or module.post_process:
            return module.shared_embedding_or_output_weight(), bool(module.pre_process)
    return None


class TiedEmbedding:
    """The exchange of one tied weight between the first and the last stage.

    Args:
        weight: this stage's copy (``E`` on the first stage, ``E'`` on the last), a model
            parameter of shape ``[vocab / TP, hidden]`` with a ``main_grad`` (megatron-core DDP).
            Each message is ``vocab / TP * hidden`` fp32 elements (divided by DP with the
            distributed optimizer), 4 bytes each.
        first: this is the first stage.
        num_stages: ``P``.
        group: the embedding group (``parallel_state.get_embedding_group()``): this rank and
            its peer at the other end of the pipeline.
        timeout_s: longest wait for the peer's message, seconds.

    Attributes:
        version: tied updates applied to this copy (on the last stage it trails the stage's
            own version; on the first stage it is the stage's version).

    Raises:
        ValueError: the group does not hold exactly this rank and one peer.
    """

    def __init__(self, weight: torch.nn.Parameter, first: bool, num_stages: int, group,
                 timeout_s: float = 600.0):
        ranks = dist.get_process_group_ranks(group)
        me = dist.get_rank()
        if len(ranks) != 2 or me not in ranks:
            raise ValueError(f"the embedding group of rank {me} is {ranks}: PACI's tied "
                             "embeddings need exactly the first and the last stage in it")
        self.weight, self.first, self.num_stages, self.group = weight, first, num_stages, group
        self.peer = ranks[1] if ranks[0] == me else ranks[0]
        self.timeout = datetime.timedelta(seconds=timeout_s)
        nccl = "nccl" in str(dist.get_backend(group)) and weight.device.type == "cuda"
        self.watchdog = Watchdog(timeout_s) if nccl else None
        self.version = 0
        self._spans: Any = _UNSET  # per DP rank, the elements its distributed optimizer steps
        self._sends: List[Tuple[Any, Tuple[torch.Tensor, ...]]] = []  # (work, kept alive)

    def set_timeout(self, timeout_s: float) -> None:
        """The longest wait for the peer's message, seconds."""
        self.timeout = datetime.timedelta(seconds=timeout_s)
        if self.watchdog is not None:
            self.watchdog.timeout_s = timeout_s

    @property
    def stage(self) -> int:
        """This copy's pipeline stage."""
        return 0 if self.first else self.num_stages - 1

    # ------------------------------------------------------------------ messages
    def _send(self, *tensors: torch.Tensor) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        for tensor in tensors:
            self._sends.append((dist.isend(tensor, self.peer, group=self.group), (tensor,)))

    def _recv(self, label: str, *like: torch.Tensor) -> List[torch.Tensor]:
        out = [torch.empty_like(t) for t in like]
        works = [dist.irecv(t, self.peer, group=self.group) for t in out]
        try:
            wait_all(works, label, self.timeout, self.watchdog)
        except (PipelineTimeout, RuntimeError) as exc:
            from .schedule import PACICommunicationError

            raise PACICommunicationError(f"{label} failed: {exc}") from exc
        return out

    def _label(self, update: int, what: str) -> str:
        return (f"stage {self.stage} of {self.num_stages}: receiving {what} of update {update} "
                f"from stage {self.num_stages - 1 - self.stage} (tied embedding)")

    def flush_sends(self) -> None:
        """Wait for every posted send (a drain's end), with the timeout."""
        works = [w for w, _ in self._sends]
        self._sends = []
        wait_all(works, f"stage {self.stage}: tied-embedding sends to stage "
                 f"{self.num_stages - 1 - self.stage}", self.timeout, self.watchdog)

    # ------------------------------------------------------------------ helpers
    def _grad_view(self, optimizer) -> torch.Tensor:
        """The part of ``main_grad`` this rank reduces: the whole tensor, or (distributed
        optimizer) its shard's elements, DP-reduced by the reduce-scatter."""
        grad = self.weight.main_grad
        if not compat.holds_main_parameter(optimizer, self.weight):
            return grad.view(-1)[:0]  # this rank's shard holds none of the weight
        shard = compat.main_shard(optimizer, self.weight)
        return grad if shard is None else grad.view(-1)[shard[0]:shard[1]]

    def _main_like(self, optimizer) -> torch.Tensor:
        """This rank's main parameter of the tied weight (an empty tensor where its
        distributed-optimizer shard holds none of it)."""
        if compat.holds_main_parameter(optimizer, self.weight):
            return compat.main_parameter(optimizer, self.weight)
        return torch.empty(0, dtype=torch.float32, device=self.weight.device)

    # ------------------------------------------------------------------ the last stage
    def send_window_grad(self, optimizer, update: int) -> None:
        """Last stage, update ``update``: send ``gL`` (its DP-reduced ``main_grad``)."""
        self._send(self._grad_view(optimizer).detach().clone())

    def excluded(self, optimizer):
        """Last stage: the context in which its own step leaves ``E'`` alone."""
        if not compat.holds_main_parameter(optimizer, self.weight):
            return contextlib.nullcontext()  # its distributed-optimizer shard holds none of E'
        return compat.ParamGroupsWithout(optimizer, self.weight)

    def catch_up(self, optimizer, upto: int) -> int:
        """Last stage: receive and apply tied updates ``version + 1 .. upto``, each the
        first stage's step (same gradient, learning rate and weight decay) on ``E'``.
        Returns the tied updates applied now.

        Raises:
            PACICommunicationError: the first stage's message did not come in time.
        """
        done = 0
        while self.version < upto:
            k = self.version + 1
            main = self._main_like(optimizer)
            grad, meta = self._recv(self._label(k, "the tied gradient"), main,
                                    torch.zeros(4, dtype=torch.float64, device=main.device))
            lr, weight_decay, group_step, applied = meta.tolist()
            if applied:
                if self._spans is _UNSET:  # the first tied update: every DP rank is here
                    self._spans = compat.shard_spans(optimizer, self.weight)
                version = self.weight._version
                try:
                    if main.numel():
                        compat.step_one_parameter(optimizer, self.weight, grad, lr,
                                                  weight_decay, int(group_step))
                    if self._spans is not None:
                        compat.gather_parameter(optimizer, self.weight, self._spans)
                finally:
                    compat.set_version_counters([self.weight], [version])
            self.version = k
            done += 1
        return done

    # ------------------------------------------------------------------ the first stage
    def add_last_stage_grad(self, optimizer, update: int) -> None:
        """First stage, update ``update``: ``main_grad += gL(update)`` (the synchronous sum,
        on this rank's shard with the distributed optimizer).

        Raises:
            PACICommunicationError: the last stage's gradient did not come in time.
        """
        mine = self._grad_view(optimizer)
        (grad,) = self._recv(self._label(update, "the output layer's gradient"), mine)
        mine.add_(grad)

    def send_step(self, optimizer, update: int, applied: bool) -> None:
        """First stage, after its update: send the gradient the step used on ``E`` (after
        clipping) with its learning rate, weight decay and (fused Adam) group step count,
        or that it was skipped."""
        main = self._main_like(optimizer)
        if main.numel():
            lr, weight_decay, group_step = compat.step_hyperparameters(optimizer, self.weight)
        else:  # nothing of the weight on this rank: the peer steps nothing either
            lr, weight_decay, group_step = 0.0, 0.0, -1
        grad = main.grad if applied and main.grad is not None else torch.zeros_like(main)
        meta = torch.tensor([lr, weight_decay, group_step, 1.0 if applied else 0.0],
                            dtype=torch.float64, device=main.device)
        self._send(grad.detach().clone(), meta)
        self.version = update
