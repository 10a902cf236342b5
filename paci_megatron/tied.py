"""Tied input embedding and output layer across stages, with no collective.

Megatron keeps the first stage's embedding ``E`` and the last stage's copy ``E'`` equal by
all-reducing their gradients over the embedding group in ``finalize_model_grads``
(``_allreduce_word_embedding_grads``), a synchronisation PACI must not have. Under PACI
(docs/design.md, "Tied embeddings"):

- the last stage, closing window ``k``, keeps its gradient ``gL(k)`` and steps everything
  but ``E'``; it sends ``gL(k)`` to the first stage once the input gradient of the window's
  last micro-batch has left it;
- the first stage, at its update ``k``, adds ``gL(k)`` to its own ``g0(k)`` and steps ``E``
  with the sum, as synchronous training does; it then sends the gradient that step used
  (after its clipping) with the step's learning rate and weight decay;
- the last stage applies that same step to ``E'`` before its forward of micro-batch
  ``e(k) + P`` (:meth:`paci_megatron.plan.TiedWindows.due`), the first of its actions that
  causally follows the first stage's update ``k``, and at the end of every drain.

Where each message is posted is part of the stage's lowered plan
(:class:`paci_megatron.plan.TiedComm`, :class:`paci_megatron.plan.TiedWindows`): both ends
post it in the same call, in the same order, at points where it can complete whatever the
stages do next, so NCCL's unbuffered sends never wait across a call boundary or a device
synchronize (:func:`paci_megatron.plan.simulate_p2p` checks it). Receives are posted early
and waited for where the data is used; sends are never waited for before a drain's end.

With Megatron's distributed optimizer each data-parallel rank holds a shard of the tied
weight's main copy; megatron-core gives the tied weight a bucket of its own on both stages
(``_does_param_require_new_bucket``), so a rank's shard covers the same elements at both
ends. Each message then carries only that shard (the DP-reduced part of the gradient after
the reduce-scatter, and the shard's clipped gradient), and the last stage rebuilds ``E'``
on its data-parallel ranks after each tied update (:func:`paci_megatron.internals.gather_parameter`,
a stage-local collective).

Both copies pass through the identical sequence of optimizer steps; ``E'`` lags the last
stage's own version by at most ``ceil((P - 1) / a)`` updates (the "tied lag", recorded by
:class:`~paci_megatron.telemetry.DriftTelemetry`), and every micro-batch meets the same
version of the tied weight at both ends of the pipeline.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import compat, internals
from .p2p import PACICommunicationError, PipelineTimeout, Watchdog, wait_all

__all__ = ["TiedEmbedding", "find_tied_embedding"]

_UNSET = object()
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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

    Memory: the last stage keeps each window gradient (``vocab / TP x hidden`` fp32, divided
    by DP with the distributed optimizer) from its update until the send completes; the
    first stage posts each receive after its forward of ``e(k) + 1`` and uses it at update
    ``k``, so up to ``ceil((P - 2) / a) + 1`` receive buffers of that size are live at once
    (one with ``a >= P - 1``, ``P - 1`` at ``a = 1``): the price of one in-order channel
    per pair, whose messages must interleave the same way at both ends.

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
        self.watchdog = Watchdog(timeout_s, device=weight.device) if nccl else None
        self.version = 0
        self._spans: Any = _UNSET  # per DP rank, the elements its distributed optimizer steps
        self._held: Dict[Tuple[str, int], Tuple[torch.Tensor, ...]] = {}  # made, not yet sent
        self._posted: Dict[Tuple[str, int], Tuple[list, Tuple[torch.Tensor, ...]]] = {}
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

    @property
    def peer_stage(self) -> int:
        """The pipeline stage at the other end."""
        return self.num_stages - 1 - self.stage

    # ------------------------------------------------------------------ handshake
    def _describe(self, optimizer) -> List[int]:
        grad, main = self._grad_view(optimizer), self._main_like(optimizer)
        return [*self.weight.shape, grad.numel(), main.numel(),
                _DTYPES.index(grad.dtype), _DTYPES.index(main.dtype)]

    def handshake(self, optimizer) -> None:
        """Both ends exchange what their messages hold (weight shape, elements and dtype of
        the gradient and of the step) and agree, at one fixed point of both programs (the
        optimizer wrapper's construction). It is the first message of the pair, so NCCL
        creates the pair's communicator here, not at a send that the peer answers much
        later in its plan. One host wait.

        Raises:
            PACIConfigError: the two ends' messages would differ (the tied weights or their
                optimizer shards are not the same shape or dtype).
            PACICommunicationError: the peer did not answer within the timeout.
        """
        from .config import PACIConfigError

        mine = torch.tensor(self._describe(optimizer), dtype=torch.int64,
                            device=self.weight.device)
        theirs = torch.empty_like(mine)
        label = (f"stage {self.stage} of {self.num_stages}: the tied embedding's handshake "
                 f"with stage {self.peer_stage}")
        ops = ([(dist.isend, mine), (dist.irecv, theirs)] if self.first
               else [(dist.irecv, theirs), (dist.isend, mine)])
        for op, tensor in ops:  # one after the other, in the same order on both ends
            self._wait([op(tensor, self.peer, group=self.group)], label)
        if theirs.tolist() != mine.tolist():
            names = ("rows", "columns", "gradient elements", "step elements",
                     "gradient dtype", "step dtype")
            differ = ", ".join(f"{n} {a} here, {b} on stage {self.peer_stage}"
                               for n, a, b in zip(names, mine.tolist(), theirs.tolist()) if a != b)
            raise PACIConfigError([
                f"stage {self.stage}: the tied embedding's copies differ ({differ}): both ends "
                "must build the same embedding (same --padded-vocab-size / "
                "--make-vocab-size-divisible-by, --hidden-size, TP, DP and optimizer), or use "
                "--untie-embeddings-and-output-weights"])

    # ------------------------------------------------------------------ messages
    def _wait(self, works: list, label: str) -> None:
        try:
            wait_all(works, label, self.timeout, self.watchdog)
        except (PipelineTimeout, RuntimeError) as exc:
            raise PACICommunicationError(f"{label} failed: {exc}") from None

    def _label(self, key: Tuple[str, int]) -> str:
        what = {"tgrad": "the output layer's gradient", "tstep": "the tied gradient"}[key[0]]
        return (f"stage {self.stage} of {self.num_stages}: {what} of update {key[1]} "
                f"with stage {self.peer_stage} (tied embedding)")

    def post(self, optimizer, op: str, key: Tuple[str, int]) -> None:
        """Post one message of the stage's lowered plan (:class:`paci_megatron.plan.TiedComm`):
        ``op`` ``"send"`` sends what this stage made for ``key`` (``("tgrad", k)`` or
        ``("tstep", k)``); ``"recv"`` posts the receive, waited for where it is used.

        Raises:
            RuntimeError: the plan posts a message this stage has not made (a planner bug).
        """
        self._release_sent()
        if op == "send":
            try:
                tensors = self._held.pop(key)
            except KeyError:
                raise RuntimeError(f"stage {self.stage}: the plan sends {key} of the tied "
                                   "embedding before this stage made it") from None
            works = [dist.isend(t, self.peer, group=self.group) for t in tensors]
            self._sends += [(w, tensors) for w in works]
            if self.watchdog is not None:  # timed from its post, in post order
                self.watchdog.watch(works, "sending " + self._label(key))
            return
        main = self._main_like(optimizer)
        if key[0] == "tgrad":
            buffers: Tuple[torch.Tensor, ...] = (torch.empty_like(self._grad_view(optimizer)),)
        else:
            buffers = (torch.empty_like(main),
                       torch.zeros(4, dtype=torch.float64, device=main.device))
        works = [dist.irecv(t, self.peer, group=self.group) for t in buffers]
        self._posted[key] = (works, buffers)
        if self.watchdog is not None:
            self.watchdog.watch(works, "receiving " + self._label(key))

    def _release_sent(self) -> None:
        """Drop the tensors of completed sends (the window gradient's copy at once, not a
        window later)."""
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]

    def _received(self, key: Tuple[str, int]) -> Tuple[torch.Tensor, ...]:
        try:
            works, buffers = self._posted.pop(key)
        except KeyError:
            raise RuntimeError(f"stage {self.stage}: {self._label(key)} was never posted "
                               "(a planner bug)") from None
        if self.watchdog is not None:  # NCCL: a stream wait; the watchdog timed it at post
            for work in works:
                work.wait()
        else:
            self._wait(works, "receiving " + self._label(key))
        self._release_sent()
        return buffers

    def finish(self) -> None:
        """A drain's end: wait for every posted send, with the timeout.

        Raises:
            PACICommunicationError: a send was not received in time.
            RuntimeError: a message made or posted was left over (a planner bug).
        """
        works = [w for w, _ in self._sends]
        self._sends = []
        self._wait(works, f"stage {self.stage}: tied-embedding sends to stage {self.peer_stage}")
        if self._held or self._posted:
            raise RuntimeError(f"stage {self.stage}: tied-embedding messages left at a drain's "
                               f"end: made {sorted(self._held)}, posted {sorted(self._posted)}")

    # ------------------------------------------------------------------ helpers
    def _grad_view(self, optimizer) -> torch.Tensor:
        """The part of ``main_grad`` this rank reduces: the whole tensor, or (distributed
        optimizer) its shard's elements, DP-reduced by the reduce-scatter."""
        grad = self.weight.main_grad
        if not internals.holds_main_parameter(optimizer, self.weight):
            return grad.view(-1)[:0]  # this rank's shard holds none of the weight
        shard = internals.main_shard(optimizer, self.weight)
        return grad if shard is None else grad.view(-1)[shard[0]:shard[1]]

    def _main_like(self, optimizer) -> torch.Tensor:
        """This rank's main parameter of the tied weight (an empty tensor where its
        distributed-optimizer shard holds none of it)."""
        if internals.holds_main_parameter(optimizer, self.weight):
            return internals.main_parameter(optimizer, self.weight)
        return torch.empty(0, dtype=torch.float32, device=self.weight.device)

    # ------------------------------------------------------------------ the last stage
    def hold_window_grad(self, optimizer, update: int) -> None:
        """Last stage, update ``update``: keep ``gL`` (its DP-reduced ``main_grad``) for the
        plan's send (``vocab / TP x hidden`` fp32 elements until then)."""
        self._held[("tgrad", update)] = (self._grad_view(optimizer).detach().clone(),)

    def excluded(self, optimizer):
        """Last stage: the context in which its own step leaves ``E'`` alone."""
        if not internals.holds_main_parameter(optimizer, self.weight):
            return contextlib.nullcontext()  # its distributed-optimizer shard holds none of E'
        return internals.ParamGroupsWithout(optimizer, self.weight)

    def catch_up(self, optimizer, upto: int) -> int:
        """Last stage: apply tied updates ``version + 1 .. upto``, each the first stage's
        step (same gradient, learning rate and weight decay) on ``E'``, from the receives
        the plan posted. Returns the tied updates applied now.

        Raises:
            PACICommunicationError: the first stage's message did not come in time.
        """
        done = 0
        while self.version < upto:
            k = self.version + 1
            grad, meta = self._received(("tstep", k))
            lr, weight_decay, group_step, applied = meta.tolist()
            if applied:
                if self._spans is _UNSET:  # the first tied update: every DP rank is here
                    self._spans = internals.shard_spans(optimizer, self.weight)
                version = self.weight._version
                try:
                    if grad.numel():
                        internals.step_one_parameter(optimizer, self.weight, grad, lr,
                                                  weight_decay, int(group_step))
                    if self._spans is not None:
                        internals.gather_parameter(optimizer, self.weight, self._spans)
                finally:
                    compat.set_version_counters([self.weight], [version])
            self.version = k
            done += 1
        return done

    # ------------------------------------------------------------------ the first stage
    def add_last_stage_grad(self, optimizer, update: int) -> None:
        """First stage, update ``update``: ``main_grad += gL(update)`` (the synchronous sum,
        on this rank's shard with the distributed optimizer), from the receive the plan
        posted.

        Raises:
            PACICommunicationError: the last stage's gradient did not come in time.
        """
        (grad,) = self._received(("tgrad", update))
        self._grad_view(optimizer).add_(grad)

    def hold_step(self, optimizer, update: int, applied: bool) -> None:
        """First stage, after its update: keep, for the plan's send, the gradient the step
        used on ``E`` (after clipping) with its learning rate, weight decay and (fused Adam)
        group step count, or that it was skipped."""
        main = self._main_like(optimizer)
        if main.numel():
            lr, weight_decay, group_step = internals.step_hyperparameters(optimizer, self.weight)
        else:  # nothing of the weight on this rank: the peer steps nothing either
            lr, weight_decay, group_step = 0.0, 0.0, -1
        grad = main.grad if applied and main.grad is not None else torch.zeros_like(main)
        meta = torch.tensor([lr, weight_decay, group_step, 1.0 if applied else 0.0],
                            dtype=torch.float64, device=main.device)
        self._held[("tstep", update)] = (grad.detach().clone(), meta)
        self.version = update
