"""The PACI schedule: a drop-in ``forward_backward_func`` for megatron-core.

:class:`PACISchedule` is called exactly like the function Megatron's
``get_forward_backward_func()`` returns (same keywords, same return value: the list of
per-micro-batch loss dicts on the last stage, ``[]`` elsewhere), but it never flushes:
the in-flight micro-batches of one call stay in flight into the next, and the stage's
optimizer update runs inside the schedule after every ``a`` backwards
(:class:`~paci_megatron.optimizer.PACIOptimizer`). The order of a stage's actions
comes from the pure planner (:mod:`paci_megatron.plan`); this module executes it with
megatron-core's ``forward_step`` / ``backward_step``, exchanging activations and
gradients in the same pairing of sends and receives as Megatron's own 1F1B
(``forward_backward_pipelining_without_interleaving``), but with a timeout on every wait
(:mod:`paci_megatron.p2p`): a stalled pipeline raises an error that names the stage, the
peer, the micro-batch and the action instead of hanging.

Point-to-point operations never straddle two calls: the gradient send that follows a
call's last backward is issued at the start of the next call (or of :meth:`drain`),
paired with the receive of that call's first activation, exactly where Megatron's
steady state would issue it. The training loop may therefore run collectives between
calls. The loop must call the schedule on every rank of the pipeline for every
iteration, as it does with Megatron's schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Union

import torch

from . import compat
from .config import PACIConfig, PACIConfigError, validate_setup
from .optimizer import PACIOptimizer
from .p2p import PipelineP2P
from .plan import (
    Action,
    Comm,
    Kind,
    StageState,
    lower,
    plan_call,
    plan_drain,
    plan_forward_only,
)
from .telemetry import DriftTelemetry

__all__ = ["PACISchedule", "PACICommunicationError", "get_forward_backward_func"]


class PACICommunicationError(RuntimeError):
    """A point-to-point operation of the pipeline failed or timed out.

    The message names the stage, the peer stage, the micro-batch and the action.
    """


class _InFlight:
    """A forwarded, not yet backwarded micro-batch: what its backward needs.

    ``output_tensor`` holds the autograd graph (memory mode "activations"); in memory
    mode "recompute" it is None and ``replay`` holds the data the forward read and the
    RNG state it started from.
    """

    __slots__ = ("index", "input_tensor", "output_tensor", "version", "replay")

    def __init__(self, index, input_tensor, output_tensor, version, replay=None):
        self.index = index
        self.input_tensor = input_tensor
        self.output_tensor = output_tensor
        self.version = version
        self.replay = replay


class PACISchedule:
    """Asynchronous 1F1B without flush, with per-stage local updates (PACI).

    Args:
        optimizer: the stage's :class:`PACIOptimizer`.
        paci_config: :class:`PACIConfig` (accumulation factor, drift checks).
        share_embeddings_and_output_weights: whether the model ties its input embedding
            and output layer (refused with P > 1).

    Attributes:
        state: the planner's :class:`~paci_megatron.plan.StageState` of this stage.
        telemetry: the stage's :class:`~paci_megatron.telemetry.DriftTelemetry`.
        trace: every executed :class:`~paci_megatron.plan.Action`, in order, when
            ``record_trace`` is True (tests and pictures).
        timeline: with ``record_timeline``, a :class:`~paci_megatron.sim.SimEvent` per
            executed forward, backward and update, in wall-clock seconds since the first
            call (write it with :func:`paci_megatron.sim.write_chrome_trace`).
        peak_in_flight: most micro-batches this stage has held in flight at once.
    """

    def __init__(
        self,
        optimizer: PACIOptimizer,
        paci_config: Optional[PACIConfig] = None,
        share_embeddings_and_output_weights: bool = False,
        record_trace: bool = False,
        record_timeline: bool = False,
    ):
        self.optimizer = optimizer
        self.paci_config = paci_config or PACIConfig()
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.state = StageState()
        self.accumulation: Optional[int] = None
        self.telemetry: Optional[DriftTelemetry] = None
        self.record_trace = record_trace
        self.trace: List[Action] = []
        self.peak_in_flight = 0
        self.record_timeline = record_timeline
        self.timeline: List[Any] = []  # paci_megatron.sim.SimEvent, wall-clock seconds
        self._t0: Optional[float] = None
        self._in_flight: Deque[_InFlight] = deque()
        self._carry: Optional[int] = None  # micro-batch whose input grad is still to be sent
        self._inbox: Dict[Tuple[str, int], Any] = {}  # received ("act"|"grad", j) tensors
        self._outbox: Dict[Tuple[str, int], Any] = {}  # produced tensors not yet sent
        self._no_sync_ctx = None
        self._ctx: Optional[Dict[str, Any]] = None
        self._validated_for: Optional[int] = None

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        *,
        forward_step_func: Callable,
        data_iterator: Union[Iterator, List[Iterator]],
        model: Union[torch.nn.Module, List[torch.nn.Module]],
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: Optional[int] = None,
        forward_only: bool = False,
        collect_non_loss_data: bool = False,
        first_val_step: Optional[bool] = None,
        adjust_tensor_shapes_fn: Optional[Callable] = None,
        p2p_communicator=None,
        pg_collection=None,
        force_all_reduce: Optional[bool] = False,
    ) -> List[Any]:
        """Run ``num_microbatches`` micro-batches through this stage (Megatron's signature).

        Training (``forward_only=False``): forwards ``m`` new micro-batches and runs the
        backwards 1F1B pairs with them; an update follows every ``a``-th backward.
        Evaluation (``forward_only=True``): drains first if anything is in flight, then
        forwards ``m`` micro-batches with no backward.

        Args: as megatron-core's ``forward_backward_pipelining_without_interleaving``.
            ``seq_length`` and ``micro_batch_size`` give the activation shape
            ``[seq_length, micro_batch_size, hidden_size]`` sent between stages.

        Returns:
            On the last stage, the list of the loss function's second outputs (one per
            micro-batch of this call, in order: Megatron's format); ``[]`` elsewhere.

        Raises:
            PACIConfigError: the configuration breaks a PACI rule (before any work).
            PACICommunicationError: a send or receive failed or timed out.
            DriftBoundError: a measured drift exceeded ``ceil((P-1-s)/a)``.
        """
        ctx = self._context(
            model=model,
            data_iterator=data_iterator,
            forward_step_func=forward_step_func,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            decoder_seq_length=decoder_seq_length,
            adjust_tensor_shapes_fn=adjust_tensor_shapes_fn,
            p2p_communicator=p2p_communicator,
            num_microbatches=num_microbatches,
            forward_only=forward_only,
        )
        store: List[Any] = []
        try:
            if forward_only:
                if not self._drained():
                    self.drain()
                steps, _ = lower(ctx["P"], ctx["stage"],
                                 plan_forward_only(ctx["stage"], num_microbatches))
                for step in steps:
                    if isinstance(step, Comm):
                        self._communicate(step, ctx)
                    else:
                        self._forward(step, ctx, store, num_microbatches, train=False,
                                      collect_non_loss_data=collect_non_loss_data,
                                      first_val_step=first_val_step)
                return store
            actions, state_after = plan_call(
                ctx["P"], ctx["stage"], num_microbatches, self.accumulation, self.state
            )
            self.optimizer.begin_call()
            self._run(actions, ctx, store)
            self.state = state_after
            return store
        finally:
            # Forwards read data only inside a call (recompute mode keeps what each read);
            # holding the iterator longer would keep a DataLoader's worker processes alive
            # until interpreter exit, where a SIGTERM handler can make their join hang.
            ctx["data_iterator"] = None

    def drain(self) -> None:
        """Finish every in-flight micro-batch and apply the update they complete.

        After a drain every stage has the same version and the model is one consistent
        set of weights. Call it on every rank of the pipeline: before evaluation (done
        automatically by ``forward_only`` calls), checkpoint saving, the end of training
        and any change of schedule. A no-op before the first training call.
        """
        if self._ctx is None or self.accumulation is None:
            return
        actions, state_after = plan_drain(
            self._ctx["P"], self._ctx["stage"], self.accumulation, self.state
        )
        self._run(actions, self._ctx, [], final=True)
        self.state = state_after

    @property
    def in_flight(self) -> int:
        """Micro-batches this stage holds forwarded and not yet backwarded."""
        return len(self._in_flight)

    def _drained(self) -> bool:
        # the last stage holds nothing in flight but still owes its last gradient: the
        # pipeline as a whole is drained only when every stage holds neither
        return not self._in_flight and self._carry is None

    @property
    def has_unsent_gradient(self) -> bool:
        """True between calls when the last backward's input gradient awaits the next call."""
        return self._carry is not None

    def state_dict(self) -> Dict[str, Any]:
        """The stage's PACI state for a checkpoint (only meaningful when drained).

        Raises:
            RuntimeError: micro-batches are in flight (``drain()`` first).
        """
        if not self._drained():
            raise RuntimeError("PACI state can only be saved on a drained pipeline: drain() first")
        telemetry = self.telemetry
        return {
            "state": dataclasses.asdict(self.state),
            "accumulation": self.accumulation,
            "version": self.optimizer.version,
            "telemetry": None if telemetry is None else {
                "num_stages": telemetry.num_stages, "stage": telemetry.stage,
                "histogram": dict(telemetry.histogram), "total": telemetry.total,
            },
        }

    def restore_drained(self, microbatches: int, accumulation: int) -> None:
        """Resume from a checkpoint written on a drained pipeline, before the first call.

        A drained stage that has trained ``microbatches`` micro-batches (iterations x m)
        has forwarded and backwarded each of them and applied ``microbatches / a``
        updates: that is its whole PACI state (what Megatron-LM's own checkpoint does not
        store). Drift telemetry starts afresh.

        Raises:
            ValueError: ``accumulation`` does not divide ``microbatches``, or the schedule
                has already run.
        """
        if self._ctx is not None or self.state != StageState():
            raise ValueError("restore_drained() must come before the schedule's first call")
        if accumulation < 1 or microbatches < 0 or microbatches % accumulation:
            raise ValueError(
                f"a drained pipeline that trained {microbatches} micro-batches cannot have "
                f"updated every {accumulation} of them")
        version = microbatches // accumulation
        self.state = StageState(forwarded=microbatches, backwarded=microbatches, pending=0,
                                version=version)
        self.optimizer.restore_version(version)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a fresh schedule (before its first call)."""
        self.state = StageState(**state["state"])
        self.accumulation = state["accumulation"]
        self.optimizer.restore_version(state["version"])
        t = state["telemetry"]
        if t is not None:
            self.telemetry = DriftTelemetry(t["num_stages"], t["stage"],
                                            check=self.paci_config.check_drift)
            self.telemetry.histogram.update({int(k): v for k, v in t["histogram"].items()})
            self.telemetry.total = t["total"]

    # ------------------------------------------------------------------ setup
    def _context(self, *, model, data_iterator, num_microbatches, forward_only, **kw):
        if isinstance(model, list):
            if len(model) != 1:
                raise PACIConfigError(
                    [f"PACI runs one model chunk per stage, got {len(model)}: remove virtual "
                     "pipeline stages"]
                )
            model = model[0]
        if isinstance(data_iterator, list):
            data_iterator = data_iterator[0]
        config = compat.get_model_config(model)
        p2p = (self._ctx or {}).get("p2p")
        if p2p is None:
            pp_group = getattr(kw["p2p_communicator"], "pp_group", None)
            if pp_group is None:
                from megatron.core import parallel_state as ps

                pp_group = ps.get_pipeline_model_parallel_group()
            p2p = PipelineP2P(pp_group, config.pipeline_dtype, self.paci_config.p2p_timeout_s)
        P, stage = p2p.pp_group.size(), p2p.pp_group.rank()
        if not forward_only and self._validated_for != num_microbatches:
            if not self._drained() and self.accumulation is not None:
                a_new = self.paci_config.resolve_accumulation(num_microbatches)
                if a_new != self.accumulation:
                    raise PACIConfigError(
                        [f"the accumulation factor changed from {self.accumulation} to {a_new} "
                         "with micro-batches in flight: call drain() before changing "
                         "the number of micro-batches"]
                    )
            self.accumulation = validate_setup(
                self.paci_config,
                num_microbatches=num_microbatches,
                pipeline_model_parallel_size=P,
                model_config=config,
                share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            )
            self._validated_for = num_microbatches
        if self.telemetry is None:
            self.telemetry = DriftTelemetry(P, stage, check=self.paci_config.check_drift)
        shapes = compat.get_tensor_shapes(
            seq_length=kw["seq_length"],
            micro_batch_size=kw["micro_batch_size"],
            decoder_seq_length=kw["decoder_seq_length"],
            config=config,
        )
        recv_shapes, send_shapes = shapes, shapes
        if kw["adjust_tensor_shapes_fn"] is not None:
            recv_shapes, send_shapes = kw["adjust_tensor_shapes_fn"](recv_shapes, send_shapes)
        if not self._drained() and self._ctx is not None and self._ctx["send_shapes"] != send_shapes:
            raise PACIConfigError(
                [f"activation shape changed from {self._ctx['send_shapes']} to {send_shapes} "
                 "with micro-batches in flight: call drain() before changing --seq-length or "
                 "--micro-batch-size"]
            )
        dp, dp_rank = 1, 0
        if torch.distributed.is_initialized():
            from megatron.core import parallel_state as ps

            dp = ps.get_data_parallel_world_size(with_context_parallel=False)
            dp_rank = ps.get_data_parallel_rank(with_context_parallel=False)
        self.optimizer.samples_per_microbatch = kw["micro_batch_size"] * dp
        if self.accumulation is not None:
            self.optimizer.accumulation = self.accumulation
        if not forward_only:
            self.optimizer.num_microbatches = num_microbatches
        self._ctx = dict(
            model=model,
            config=config,
            p2p=p2p,
            P=P,
            stage=stage,
            first=stage == 0,
            last=stage == P - 1,
            data_iterator=data_iterator,
            forward_step_func=kw["forward_step_func"],
            recv_shapes=recv_shapes,
            send_shapes=send_shapes,
            model_type=compat.get_model_type(model),
            dp_rank=dp_rank,
        )
        return self._ctx

    # ------------------------------------------------------------------ execution
    def _run(self, actions: List[Action], ctx: Dict[str, Any], store: List[Any],
             final: bool = False) -> None:
        """Execute one stage's actions with the p2p calls :func:`plan.lower` puts around
        them; ``final`` (a drain) also sends the last gradient."""
        steps, self._carry = lower(ctx["P"], ctx["stage"], actions, self._carry, final)
        computes = [st for st in steps if not isinstance(st, Comm)]
        next_of = {id(a): (computes[i + 1] if i + 1 < len(computes) else None)
                   for i, a in enumerate(computes)}
        for step in steps:
            if isinstance(step, Comm):
                self._communicate(step, ctx)
                continue
            if self.record_trace:
                self.trace.append(step)
            start, version = time.perf_counter(), self.optimizer.version
            if step.kind is Kind.FORWARD:
                self._forward(step, ctx, store, self.accumulation, train=True)
            elif step.kind is Kind.BACKWARD:
                nxt = next_of[id(step)]
                self._backward(step, ctx, closes_window=nxt is not None and nxt.kind is Kind.UPDATE)
            else:
                self.optimizer.local_update(step.index)
            if self.record_timeline:
                self._record(step, ctx, start, version)
        if final:
            self._set_grad_sync(ctx, enabled=True)

    def _record(self, step: Action, ctx: Dict[str, Any], start: float, version: int) -> None:
        from .sim import SimEvent

        if self._t0 is None:
            self._t0 = start
        self.timeline.append(SimEvent(ctx["stage"], step.kind, step.index, start - self._t0,
                                      time.perf_counter() - self._t0, version,
                                      replica=ctx.get("dp_rank", 0)))

    def _communicate(self, comm: Comm, ctx: Dict[str, Any]) -> None:
        """One exchange with a neighbour; errors name stage, peer, micro-batch and action."""
        payload = self._outbox.pop(comm.send, None) if comm.send is not None else None
        out0 = payload[0] if isinstance(payload, list) else payload
        recv_prev = recv_next = None
        if comm.recv is not None:
            if comm.recv[0] == "act":
                recv_prev = ctx["recv_shapes"][0]
            else:
                recv_next = ctx["send_shapes"][0]
        try:
            from_prev, from_next = ctx["p2p"].exchange(
                send_next=out0 if comm.send is not None and comm.send[0] == "act" else None,
                send_prev=out0 if comm.send is not None and comm.send[0] == "grad" else None,
                recv_prev_shape=recv_prev,
                recv_next_shape=recv_next,
            )
        except Exception as exc:  # PipelineTimeout, or gloo/NCCL errors from a dead peer
            what = []
            if comm.send is not None:
                what.append(f"sending the {_name(comm.send)}")
            if comm.recv is not None:
                what.append(f"receiving the {_name(comm.recv)}")
            raise PACICommunicationError(
                f"stage {ctx['stage']} of {ctx['P']}: {' and '.join(what)} "
                f"({comm.op}) with stage {comm.peer()} failed: {exc}"
            ) from exc
        got = from_prev if from_prev is not None else from_next
        if comm.recv is not None:
            self._inbox[comm.recv] = got
        if comm.send is not None and comm.send[0] == "act":
            # Megatron frees the sent activation's storage; backward needs only its grad_fn.
            from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

            deallocate_output_tensor(out0, ctx["config"].deallocate_pipeline_outputs)

    def _forward(self, action, ctx, store, loss_divisor, *, train,
                 collect_non_loss_data=False, first_val_step=None) -> None:
        j = action.index
        input_tensor = self._inbox.pop(("act", j), None)
        recompute = train and self.paci_config.memory_mode == "recompute"
        data_iterator, rng = ctx["data_iterator"], None
        if recompute:
            # keep only the stage input, the data this forward reads and the RNG state;
            # the backward recomputes the forward with the weights current at that time
            data_iterator = _Recording(ctx["data_iterator"])
            rng = _rng_state()
        with torch.no_grad() if recompute else contextlib.nullcontext():
            output_tensor = self._forward_step(ctx, j, input_tensor, data_iterator, store,
                                               loss_divisor, collect_non_loss_data,
                                               bool(first_val_step) if not train and j == 0 else False)
        if not ctx["last"]:
            self._outbox[("act", j)] = output_tensor
        if not train:
            return
        self._in_flight.append(_InFlight(
            j, input_tensor, None if recompute else output_tensor, self.optimizer.version,
            replay=(data_iterator.items, rng) if recompute else None))
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))

    def _forward_step(self, ctx, j, input_tensor, data_iterator, store, loss_divisor,
                      collect_non_loss_data=False, is_first_microbatch=False):
        output_tensor, _num_tokens = compat.forward_step(
            forward_step_func=ctx["forward_step_func"],
            data_iterator=data_iterator,
            model=ctx["model"],
            num_microbatches=loss_divisor,
            input_tensor=input_tensor,
            forward_data_store=store,
            config=ctx["config"],
            cp_group_size=_cp_size(),
            collect_non_loss_data=collect_non_loss_data,
            checkpoint_activations_microbatch=None,
            is_first_microbatch=is_first_microbatch,
            current_microbatch=j,
            is_last_stage=ctx["last"],
        )
        return output_tensor

    def _recompute_forward(self, ctx, item: "_InFlight"):
        """Memory mode: the forward again, with grad and the CURRENT weights."""
        items, rng = item.replay
        saved = _rng_state()
        _set_rng_state(rng)
        try:
            output = self._forward_step(ctx, item.index, item.input_tensor, iter(items), [],
                                        self.accumulation)
        finally:
            _set_rng_state(saved)
        if not ctx["last"]:
            from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

            deallocate_output_tensor(output, ctx["config"].deallocate_pipeline_outputs)
        return output

    def _backward(self, action, ctx, closes_window: bool) -> None:
        item = self._in_flight.popleft()
        if item.index != action.index:
            raise RuntimeError(
                f"stage {ctx['stage']}: plan wants backward of micro-batch {action.index} but "
                f"the oldest in flight is {item.index}"
            )
        grad = self._inbox.pop(("grad", action.index), None)
        self._set_grad_sync(ctx, enabled=closes_window)
        output = item.output_tensor
        if item.replay is not None:
            output = self._recompute_forward(ctx, item)
        input_grad = compat.backward_step(
            item.input_tensor, output, grad, ctx["model_type"], ctx["config"]
        )
        self.optimizer.note_backward()
        drift = self.optimizer.version - item.version
        if self.telemetry is not None:
            self.telemetry.record(action.index, drift, self.accumulation)
        if not ctx["first"]:
            self._outbox[("grad", action.index)] = input_grad

    def _set_grad_sync(self, ctx, enabled: bool) -> None:
        """Megatron's ``no_sync``: DP grad reduction only for the window's last backward."""
        if enabled and self._no_sync_ctx is not None:
            self._no_sync_ctx.__exit__(None, None, None)
            self._no_sync_ctx = None
        elif not enabled and self._no_sync_ctx is None:
            no_sync = ctx["config"].no_sync_func or getattr(ctx["model"], "no_sync", None)
            if no_sync is None:
                return
            self._no_sync_ctx = no_sync()
            self._no_sync_ctx.__enter__()


class _Recording:
    """Iterator that remembers what it hands out (the data of one forward)."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.items: List[Any] = []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.items.append(item)
        return item


def _rng_state():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, get_cuda_rng_tracker().get_states()


def _set_rng_state(state) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    cpu, cuda, tracker = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    get_cuda_rng_tracker().set_states(tracker)


def _name(tensor) -> str:
    kind, j = tensor
    return f"{'activation' if kind == 'act' else 'gradient'} of micro-batch {j}"


def _cp_size() -> int:
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        return 1
    return ps.get_context_parallel_world_size()


def get_forward_backward_func(
    optimizer: PACIOptimizer,
    paci_config: Optional[PACIConfig] = None,
    share_embeddings_and_output_weights: bool = False,
) -> PACISchedule:
    """PACI's counterpart of megatron-core's ``get_forward_backward_func()``.

    Returns a :class:`PACISchedule` bound to the stage's optimizer wrapper; call it with
    the keywords Megatron's training loop passes, and ``.drain()`` it before evaluation
    outside the schedule, checkpoint saving and exit.
    """
    return PACISchedule(optimizer, paci_config, share_embeddings_and_output_weights)
