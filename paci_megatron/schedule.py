"""The PACI schedule: a drop-in ``forward_backward_func`` for megatron-core.

:class:`PACISchedule` is called exactly like the function Megatron's
``get_forward_backward_func()`` returns (same keywords, same return value), but it never
flushes: in-flight micro-batches stay in flight into the next call, and the stage's
optimizer update runs inside the schedule after every ``a`` backwards. It executes the
lowered plan of :mod:`paci_megatron.plan` with megatron-core's ``forward_step`` /
``backward_step`` and Megatron's pairing of sends and receives, with a timeout on every
wait (:mod:`paci_megatron.p2p`). No point-to-point operation straddles two calls, so the
training loop may run collectives between them (docs/design.md, "The schedule").
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import compat
from .config import PACIConfig, PACIConfigError, Settings, Setup, refuse
from .optimizer import PACIOptimizer, Window
from .p2p import PACICommunicationError, PipelineP2P
from .plan import (Action, Comm, GradSync, Kind, StageState, TiedComm, TiedWindows, advance,
                   lower, mean_drift, plan_call, plan_drain, plan_forward_only)
from .telemetry import DriftTelemetry, TimelineEvent

__all__ = ["PACISchedule", "PACICommunicationError", "get_forward_backward_func", "build"]


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one call of the schedule works with; fixed for the call.

    ``recv_shapes`` / ``send_shapes`` are lists of ``(seq, micro batch, hidden)`` shapes of
    the tensors that cross stages; ``samples_per_microbatch`` is micro batch x DP.
    """

    model: Any
    config: Any
    p2p: PipelineP2P
    num_stages: int
    stage: int
    recv_shapes: Sequence[Any]
    send_shapes: Sequence[Any]
    model_type: Any
    dp_rank: int
    samples_per_microbatch: int
    num_microbatches: int
    forward_step_func: Optional[Callable] = None
    data_iterator: Any = None

    @property
    def first(self) -> bool:
        """This stage holds the embedding (reads data, sends no gradient)."""
        return self.stage == 0

    @property
    def last(self) -> bool:
        """This stage computes the loss (sends no activation)."""
        return self.stage == self.num_stages - 1


class _InFlight:
    """A forwarded, not yet backwarded micro-batch: what its backward needs.

    ``output_tensor`` holds the autograd graph (memory mode "activations"); in memory
    mode "recompute" it is None and ``replay`` holds the data the forward read and the
    RNG state it started from. ``version``: the stage's version at the forward.
    ``num_tokens``: (last stage, ``calculate_per_token_loss``) the loss function's token
    count of the micro-batch, a 0-dim int tensor.
    """

    __slots__ = ("index", "input_tensor", "output_tensor", "version", "replay", "num_tokens")

    def __init__(self, index, input_tensor, output_tensor, version, replay=None,
                 num_tokens=None):
        self.index = index
        self.input_tensor = input_tensor
        self.output_tensor = output_tensor
        self.version = version
        self.replay = replay
        self.num_tokens = num_tokens


class PACISchedule:
    """Asynchronous 1F1B without flush, with per-stage local updates (PACI).

    Args:
        optimizer: the stage's :class:`PACIOptimizer`.
        paci: resolved :class:`~paci_megatron.config.Settings` (what the front ends pass:
            :func:`build`), or a :class:`PACIConfig`, resolved and checked at the first
            training call with the model's config (a tied embedding is found by the
            optimizer wrapper, which keeps its two copies in step, :mod:`paci_megatron.tied`).
        record_trace: keep every executed action in :attr:`trace`.
        record_timeline: keep a :class:`~paci_megatron.telemetry.TimelineEvent` per
            executed action in :attr:`timeline` (also on where the settings name a trace).

    Attributes:
        state: the stage's :class:`~paci_megatron.plan.StageState`, updated action by
            action: the one record of its version (updates applied) and pending window.
        telemetry: the stage's :class:`~paci_megatron.telemetry.DriftTelemetry`.
        trace: every executed :class:`~paci_megatron.plan.Action`, in order, when
            ``record_trace`` is True (tests and pictures).
        timeline: the recorded events, in wall-clock seconds since the first action
            (written by :meth:`finish` where the settings name a trace file).
        peak_in_flight: most micro-batches this stage has held in flight at once.
        iteration: training calls completed, a resumed run's earlier ones included: the
            schedule drains after each of the first ``sync_warmup_iters`` and after every
            ``drain_interval``-th (its own drain decisions; the training loop drains before
            evaluation, saving and exit).
        settings: the resolved :class:`~paci_megatron.config.Settings` (None before the
            first training call when built from a :class:`PACIConfig`).
        replans: each change of the micro-batches per iteration (a batch-size ramp), with
            the drain it took where the accumulation factor changed.
    """

    def __init__(
        self,
        optimizer: PACIOptimizer,
        paci: Union[Settings, PACIConfig, None] = None,
        record_trace: bool = False,
        record_timeline: bool = False,
    ):
        self.optimizer = optimizer
        self.settings: Optional[Settings] = paci if isinstance(paci, Settings) else None
        self.paci_config = paci.config if isinstance(paci, Settings) else (paci or PACIConfig())
        self.state = StageState()
        self._origin = StageState()  # the drained state windows are counted from
        self.iteration = 0
        self._finished = False
        self.telemetry: Optional[DriftTelemetry] = None
        self.record_trace = record_trace
        self.trace: List[Action] = []
        self.peak_in_flight = 0
        self.record_timeline = record_timeline or bool(self.paci_config.trace)
        self.timeline: List[TimelineEvent] = []
        self._t0: Optional[float] = None
        self._in_flight: Deque[_InFlight] = deque()
        self._carry: Optional[int] = None  # micro-batch whose input grad is still to be sent
        self._inbox: Dict[Tuple[str, int], Any] = {}  # received ("act"|"grad", j) tensors
        self._outbox: Dict[Tuple[str, int], Any] = {}  # produced tensors not yet sent
        # --calculate-per-token-loss: micro-batch j's token count travels backward with its
        # gradient; the counts of the window being accumulated add up on every stage
        self._token_inbox: Dict[int, torch.Tensor] = {}
        self._token_outbox: Dict[int, torch.Tensor] = {}
        self._window_tokens: Optional[torch.Tensor] = None
        self._no_sync_ctx = None
        self._run: Optional[_Run] = None  # the last call's (data iterator dropped)
        #: the accumulation factor and settings a loaded checkpoint was trained with
        self.restored_from: Dict[str, Any] = {}
        #: every change of ``m`` between training calls (a batch-size ramp): the iterations
        #: completed before it, the old and new ``m``, the new ``a``, whether it drained
        self.replans: List[Dict[str, Any]] = []
        self._tp_group = self._cp_group = None  # with the pipeline group, from the first call

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
        forwards ``m`` micro-batches with no backward. The first ``sync_warmup_iters``
        training calls end with a drain (synchronous warm-up: those iterations are exactly
        1F1B), and so does every ``drain_interval``-th.

        Args: as megatron-core's ``forward_backward_pipelining_without_interleaving``.
            ``seq_length`` and ``micro_batch_size`` give the activation shape
            ``[seq_length, micro_batch_size, hidden_size]`` sent between stages.

        Returns:
            On the last stage, the list of the loss function's second outputs (one per
            micro-batch of this call, in order: Megatron's format); ``[]`` elsewhere.

        Raises:
            PACIConfigError: the configuration breaks a PACI rule (a row of
                :data:`~paci_megatron.config.REFUSALS`: several model chunks, a multi-module
                ``pg_collection`` / ``p2p_communicator``, ...), before any work. The
                pipeline, TP, CP groups are the first call's (:func:`compat.process_groups`).
            PACICommunicationError: a send or receive failed or timed out.
            DriftBoundError: a measured drift exceeded ``ceil((P-1-s)/a)``.
        """
        refuse(Setup(chunks=len(model) if isinstance(model, list) else 1,
                     collections=(pg_collection, p2p_communicator)))
        if isinstance(model, list):
            model = model[0]
        if isinstance(data_iterator, list):
            data_iterator = data_iterator[0]
        run = self._prepare(model, num_microbatches, forward_only, seq_length, micro_batch_size,
                            decoder_seq_length, adjust_tensor_shapes_fn, p2p_communicator,
                            pg_collection)
        # what a drain inside this call (the synchronous warm-up's) runs with, also when
        # this is the first call of a resumed run
        self._run = run
        run = dataclasses.replace(run, forward_step_func=forward_step_func,
                                  data_iterator=data_iterator)
        store: List[Any] = []
        timers = run.config.timers  # Megatron-LM's timing log ('forward-backward')
        if timers is not None:  # no barrier: it would realign the stages at every call
            timers("forward-backward", log_level=1).start(barrier=False)
        try:
            if forward_only:
                if not self._drained():
                    self.drain()
                steps, _ = lower(run.num_stages, run.stage,
                                 plan_forward_only(run.stage, num_microbatches))
                for step in steps:
                    if isinstance(step, Comm):
                        self._communicate(step, run)
                    else:
                        self._forward(step, run, store, num_microbatches, train=False,
                                      collect_non_loss_data=collect_non_loss_data,
                                      first_val_step=first_val_step)
                return store
            actions, state_after = plan_call(
                run.num_stages, run.stage, num_microbatches, self.accumulation, self.state)
            self.optimizer.begin_call(self.state.backwarded)
            self._execute(actions, run, store)
            assert self.state == state_after, (self.state, state_after)
            self.iteration += 1
            settings = self.settings
            if (self.iteration <= settings.sync_warmup_iters  # exactly 1F1B
                    or (settings.drain_interval and self.iteration % settings.drain_interval == 0)):
                self.drain()
            return store
        finally:
            if timers is not None:
                timers("forward-backward").stop()
            # Forwards read data only inside a call (recompute mode keeps what each read);
            # holding the iterator longer would keep a DataLoader's worker processes alive
            # until interpreter exit, where a SIGTERM handler can make their join hang.
            self._run = dataclasses.replace(run, data_iterator=None)

    def drain(self) -> None:
        """Finish every in-flight micro-batch and apply the update they complete.

        After a drain every stage has the same version and the model is one consistent
        set of weights. Call it on every rank of the pipeline: before evaluation (done
        automatically by ``forward_only`` calls), checkpoint saving, the end of training
        and any change of schedule. A no-op before the first training call.
        """
        if self._run is None or self.accumulation is None:
            return
        actions, _ = plan_drain(self._run.num_stages, self._run.stage, self.accumulation,
                                self.state)
        self._execute(actions, self._run, [], final=True)
        tied = self.optimizer.tied
        if tied is not None:  # both copies of a tied embedding equal again
            if not tied.first:
                tied.catch_up(self.optimizer, self.state.version)
            tied.finish()
        self._origin = self.state
        self.optimizer.settle()
        self.optimizer.finish_param_gather()  # the drained weights, gathered on every replica

    def finish(self) -> Optional[int]:
        """The end of training (or an exit): drain, then write the run's trace where the
        settings name a file (:func:`~paci_megatron.telemetry.write_run_trace`, a collective
        over the pipeline group: call it on every rank). Only the first call does anything.

        Returns:
            The actions written, on the rank that wrote the trace; None elsewhere.
        """
        if self._finished:
            return None
        self._finished = True
        self.drain()
        if not self.paci_config.trace:
            return None
        from .telemetry import write_run_trace

        return write_run_trace(self.paci_config.trace, self.timeline)

    @property
    def accumulation(self) -> Optional[int]:
        """``a`` of the current settings (None before they are resolved)."""
        return self.settings.accumulation if self.settings is not None else None

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
        config = self.paci_config
        return {"state": dataclasses.asdict(self.state), "accumulation": self.accumulation,
                "iteration": self.iteration,
                "settings": {"lookahead": config.lookahead,
                             "sync_warmup_iters": config.sync_warmup_iters},
                "telemetry": None if telemetry is None else {
                    "num_stages": telemetry.num_stages, "stage": telemetry.stage,
                    "histogram": dict(telemetry.histogram), "total": telemetry.total,
                    "tied_lag": dict(telemetry.tied_lag)}}

    @staticmethod
    def drained_state(microbatches: int, accumulation: int, iteration: int,
                      whole_windows: bool = True) -> Dict[str, Any]:
        """The :meth:`state_dict` of a drained stage that trained ``microbatches``
        micro-batches in ``iteration`` training calls, in windows of ``accumulation`` (what a
        checkpoint that does not store PACI's state, such as Megatron-LM's, implies); drift
        telemetry starts afresh. ``whole_windows=False``: the windows had other sizes before
        (a batch-size ramp); the version then counts windows of today's size, rounded down
        (every stage computes the same; a version only ever counts relative to another).

        Raises:
            ValueError: ``accumulation`` does not divide ``microbatches`` (with
                ``whole_windows``).
        """
        if accumulation < 1 or microbatches < 0 or (whole_windows and microbatches % accumulation):
            raise ValueError(
                f"a drained pipeline that trained {microbatches} micro-batches cannot have "
                f"updated every {accumulation} of them")
        state = StageState(forwarded=microbatches, backwarded=microbatches, pending=0,
                           version=microbatches // accumulation)
        return {"state": dataclasses.asdict(state), "accumulation": accumulation,
                "iteration": iteration, "telemetry": None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (or :meth:`drained_state`): before the first call.
        The windows (and a tied embedding's messages) are counted afresh from the restored
        state, so the run may continue with another accumulation factor.

        Raises:
            ValueError: the schedule has already run, the state is not drained, or it does
                not say how many iterations it trained.
        """
        if "iteration" not in state:
            raise ValueError("a PACI state without its iteration count (an older checkpoint): "
                             "add state['iteration'] = the checkpoint's iteration")
        if self._run is not None or self.state != StageState():
            raise ValueError("load_state_dict() must come before the schedule's first call")
        restored = StageState(**state["state"])
        if restored.in_flight or restored.pending:
            raise ValueError(f"a checkpoint's PACI state must be drained, got {restored}")
        self.state = self._origin = restored
        self.iteration = int(state["iteration"])
        self.restored_from = {"accumulation": state.get("accumulation"),
                              **(state.get("settings") or {})}
        if self.optimizer.tied is not None:
            self.optimizer.tied.version = restored.version
        self.telemetry = None
        t = state.get("telemetry")
        if t is not None:
            self.telemetry = DriftTelemetry(t["num_stages"], t["stage"],
                                            check=self.paci_config.check_drift)
            self.telemetry.histogram.update({int(k): v for k, v in t["histogram"].items()})
            self.telemetry.total = t["total"]
            self.telemetry.tied_lag.update({int(k): v for k, v in t.get("tied_lag", {}).items()})

    # ------------------------------------------------------------------ setup
    def _prepare(self, model, num_microbatches, forward_only, seq_length, micro_batch_size,
                 decoder_seq_length, adjust_tensor_shapes_fn, p2p_communicator,
                 pg_collection) -> _Run:
        """The call's :class:`_Run`; validates the setup when ``m`` changes (training).

        The process groups come from ``pg_collection`` / ``p2p_communicator`` where Megatron
        passes them (:func:`compat.process_groups`), fixed at the first call."""
        config = compat.get_model_config(model)
        p2p = self._run.p2p if self._run is not None else None
        if p2p is None:  # the first call: bind to the optimizer and guard the grad buffers
            pp_group, self._tp_group, self._cp_group = compat.process_groups(pg_collection,
                                                                             p2p_communicator)
            self.optimizer.attach(lambda: self.state)
            for chunk in self.optimizer.model:
                chunk.zero_grad_buffer = self._guarded_zero_grad_buffer(chunk.zero_grad_buffer)
            p2p = PipelineP2P(pp_group, config.pipeline_dtype, self.paci_config.p2p_timeout_s)
            if self.optimizer.tied is not None:
                self.optimizer.tied.set_timeout(self.paci_config.p2p_timeout_s)
        P, stage = p2p.pp_group.size(), p2p.pp_group.rank()
        if not forward_only:
            self._resolve(num_microbatches, P, config)
        if self.telemetry is None:
            self.telemetry = DriftTelemetry(P, stage, check=self.paci_config.check_drift)
        shapes = compat.get_tensor_shapes(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                          decoder_seq_length=decoder_seq_length, config=config,
                                          tp_group=self._tp_group, cp_group=self._cp_group)
        recv_shapes, send_shapes = shapes, shapes
        if adjust_tensor_shapes_fn is not None:
            recv_shapes, send_shapes = adjust_tensor_shapes_fn(recv_shapes, send_shapes)
        if not self._drained() and self._run is not None and self._run.send_shapes != send_shapes:
            raise PACIConfigError(
                [f"activation shape changed from {self._run.send_shapes} to {send_shapes} "
                 "with micro-batches in flight: call drain() before changing --seq-length or "
                 "--micro-batch-size"])
        dp, dp_rank = 1, 0
        if torch.distributed.is_initialized():
            from megatron.core import parallel_state as ps

            dp = ps.get_data_parallel_world_size(with_context_parallel=False)
            dp_rank = ps.get_data_parallel_rank(with_context_parallel=False)
        previous_m = self._run.num_microbatches if self._run is not None else num_microbatches
        return _Run(model=model, config=config, p2p=p2p, num_stages=P, stage=stage,
                    recv_shapes=recv_shapes, send_shapes=send_shapes,
                    model_type=compat.get_model_type(model), dp_rank=dp_rank,
                    samples_per_microbatch=micro_batch_size * dp,
                    num_microbatches=previous_m if forward_only else num_microbatches)

    def _resolve(self, num_microbatches: int, num_stages: int, config) -> None:
        """The settings for this call's ``m``: those given (the front ends resolved them
        once), or resolved here at the first call, with the model's config, every refusal
        checked. When ``m`` changes (Megatron-LM's ``--rampup-batch-size`` or
        ``--step-batch-size-schedule``) they are resolved again; where the accumulation factor changes with it, the
        pipeline drains first, so that every window keeps one size (every stage sees the
        new ``m`` at the same call and drains there). Each change is kept in
        :attr:`replans`."""
        settings = self.settings
        if settings is not None and settings.num_microbatches == num_microbatches:
            return
        if settings is not None:
            a_new = self.paci_config.resolve_accumulation(num_microbatches)  # may refuse
            drained = False
            if a_new != settings.accumulation and not self._drained():
                self.drain()
                drained = True
            self.settings = settings.for_microbatches(num_microbatches, model_config=config)
            self.replans.append({"iteration": self.iteration, "from_m": settings.num_microbatches,
                                 "to_m": num_microbatches,
                                 "accumulation": self.settings.accumulation, "drained": drained})
        else:
            self.settings = self.paci_config.resolve(
                num_microbatches=num_microbatches, pipeline_model_parallel_size=num_stages,
                model_config=config, tied=self.optimizer.tied is not None)

    def _guarded_zero_grad_buffer(self, original: Callable[[], None]) -> Callable[[], None]:
        def zero_grad_buffer() -> None:
            # A training loop zeroes grad buffers at every iteration start; under PACI a
            # window spans iterations, so keep a partly accumulated window.
            if self.state.pending == 0:
                original()

        return zero_grad_buffer

    # ------------------------------------------------------------------ execution
    def _execute(self, actions: List[Action], run: _Run, store: List[Any],
                 final: bool = False) -> None:
        """Execute one stage's actions with the steps :func:`plan.lower` puts around them
        (exchanges, grad-sync marks); ``final`` (a drain) also sends the last gradient."""
        tied = self.optimizer.tied
        windows = (TiedWindows(run.num_stages, self.accumulation, self._origin)
                   if tied is not None else None)
        steps, self._carry = lower(run.num_stages, run.stage, actions, self._carry, final,
                                   tied=windows, state=self.state)
        closes_window = False
        for step in steps:
            if isinstance(step, Comm):
                self._communicate(step, run)
                continue
            if isinstance(step, TiedComm):
                tied.post(self.optimizer, step.op, step.tensor)
                continue
            if isinstance(step, GradSync):
                closes_window = True
                continue
            if self.record_trace:
                self.trace.append(step)
            start, version = time.perf_counter(), self.state.version
            if step.kind is Kind.FORWARD:
                if run.last and windows is not None:
                    self._tied_catch_up(step.index, windows)
                self._forward(step, run, store, self.accumulation, train=True)
            elif step.kind is Kind.BACKWARD:
                self._backward(step, run, closes_window)
                closes_window = False
            else:
                self._update(step, run)
            self.state = advance(run.num_stages, self.state, step, self.accumulation)
            if self.record_timeline:
                self._record(step, run, start, version)
        if final:
            self._set_grad_sync(run, enabled=True)
            self.optimizer.finish_param_gather()

    def _tied_catch_up(self, microbatch: int, windows: TiedWindows) -> None:
        """Last stage, before a training forward: the tied updates due (plan's
        :meth:`~paci_megatron.plan.TiedWindows.due`), then the tied lag is recorded."""
        tied, version = self.optimizer.tied, self.state.version
        upto = min(windows.due(microbatch), version)
        if upto > tied.version:  # a gather of its bucket landing later would undo the step
            self.optimizer.finish_param_gather([tied.weight])
        tied.catch_up(self.optimizer, upto)
        if self.telemetry is not None:
            self.telemetry.record_tied_lag(microbatch, version - tied.version, self.accumulation)

    def _update(self, action: Action, run: _Run) -> None:
        window_start = self.state.backwarded - self.state.pending
        num_tokens, self._window_tokens = self._window_tokens, None
        self.optimizer.local_update(Window(
            update=action.index, first_microbatch=window_start, size=self.state.pending,
            num_tokens=num_tokens,
            samples_per_microbatch=run.samples_per_microbatch,
            num_microbatches=run.num_microbatches, stage=run.stage,
            # the next window is stale only if micro-batches are in flight across this update
            mean_drift=mean_drift(run.num_stages, run.stage, self.accumulation)
            if self._in_flight else 0.0))

    def _record(self, step: Action, run: _Run, start: float, version: int) -> None:
        if self._t0 is None:
            self._t0 = start
        self.timeline.append(TimelineEvent(run.stage, step.kind, step.index, start - self._t0,
                                           time.perf_counter() - self._t0, version,
                                           replica=run.dp_rank))

    def _communicate(self, comm: Comm, run: _Run) -> None:
        """One exchange with a neighbour; errors name stage, peer, micro-batch and action."""
        payload = self._outbox.pop(comm.send, None) if comm.send is not None else None
        out0 = payload[0] if isinstance(payload, list) else payload
        kind = comm.recv[0] if comm.recv is not None else None
        recv_prev = run.recv_shapes[0] if kind == "act" else None
        recv_next = run.send_shapes[0] if kind == "grad" else None
        what = ([f"sending the {_name(comm.send)}"] if comm.send is not None else []) + (
            [f"receiving the {_name(comm.recv)}"] if comm.recv is not None else [])
        label = (f"stage {run.stage} of {run.num_stages}: {' and '.join(what)} ({comm.op}) "
                 f"with stage {comm.peer()}")
        per_token = _per_token_loss(run.config)
        count_out = (self._token_outbox.pop(comm.send[1]) if per_token and comm.send is not None
                     and comm.send[0] == "grad" else None)
        count_in = (torch.empty(1, dtype=torch.int, device=run.p2p.device) if per_token
                    and kind == "grad" else None)
        if comm.send is not None:  # the receiver's buffer: the shape it receives
            run.p2p.check_send(out0, run.send_shapes[0] if comm.send[0] == "act"
                               else run.recv_shapes[0], label)
        try:
            from_prev, from_next = run.p2p.exchange(
                send_next=out0 if comm.send is not None and comm.send[0] == "act" else None,
                send_prev=out0 if comm.send is not None and comm.send[0] == "grad" else None,
                recv_prev_shape=recv_prev, recv_next_shape=recv_next, label=label,
                send_prev_count=count_out, recv_next_count=count_in)
        except Exception as exc:  # PipelineTimeout, or gloo/NCCL errors from a dead peer
            raise PACICommunicationError(f"{label} failed: {exc}") from None
        got = from_prev if from_prev is not None else from_next
        if comm.recv is not None:
            self._inbox[comm.recv] = got
        if count_in is not None:
            self._token_inbox[comm.recv[1]] = count_in
        if comm.send is not None and comm.send[0] == "act":
            # Megatron frees the sent activation's storage; backward needs only its grad_fn.
            from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

            deallocate_output_tensor(out0, run.config.deallocate_pipeline_outputs)

    def _forward(self, action, run: _Run, store, loss_divisor, *, train,
                 collect_non_loss_data=False, first_val_step=None) -> None:
        j = action.index
        input_tensor = self._inbox.pop(("act", j), None)
        recompute = train and self.paci_config.memory_mode == "recompute"
        data_iterator, rng = run.data_iterator, None
        if recompute:
            # keep only the stage input, the data this forward reads and the RNG state;
            # the backward recomputes the forward with the weights current at that time
            data_iterator = _Recording(run.data_iterator)
            rng = _rng_state()
        with torch.no_grad() if recompute else contextlib.nullcontext():
            output_tensor, num_tokens = self._forward_step(
                run, j, input_tensor, data_iterator, store, loss_divisor, collect_non_loss_data,
                bool(first_val_step) if not train and j == 0 else False)
        if not run.last:
            self._outbox[("act", j)] = output_tensor
        if not train:
            return
        self._in_flight.append(_InFlight(
            j, input_tensor, None if recompute else output_tensor, self.state.version,
            replay=(data_iterator.items, rng) if recompute else None,
            num_tokens=num_tokens if run.last and _per_token_loss(run.config) else None))
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))

    def _forward_step(self, run: _Run, j, input_tensor, data_iterator, store, loss_divisor,
                      collect_non_loss_data=False, is_first_microbatch=False):
        """megatron-core's ``forward_step``: ``(output_tensor, num_tokens)``."""
        return compat.forward_step(
            forward_step_func=run.forward_step_func, data_iterator=data_iterator, model=run.model,
            num_microbatches=loss_divisor, input_tensor=input_tensor, forward_data_store=store,
            config=run.config, cp_group_size=self._cp_group.size(),
            collect_non_loss_data=collect_non_loss_data, checkpoint_activations_microbatch=None,
            is_first_microbatch=is_first_microbatch, current_microbatch=j, is_last_stage=run.last)

    def _recompute_forward(self, run: _Run, item: "_InFlight"):
        """Memory mode: the forward again, with grad and the CURRENT weights."""
        items, rng = item.replay
        saved = _rng_state()
        _set_rng_state(rng)
        try:
            output, _ = self._forward_step(run, item.index, item.input_tensor, iter(items), [],
                                           self.accumulation)
        finally:
            _set_rng_state(saved)
        if not run.last:
            from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

            deallocate_output_tensor(output, run.config.deallocate_pipeline_outputs)
        return output

    def _backward(self, action, run: _Run, closes_window: bool) -> None:
        item = self._in_flight.popleft()
        if item.index != action.index:
            raise RuntimeError(
                f"stage {run.stage}: plan wants backward of micro-batch {action.index} but "
                f"the oldest in flight is {item.index}")
        grad = self._inbox.pop(("grad", action.index), None)
        # the backward reads the current weights, and no forward pre-hook waited for their
        # gather where this backward follows a local update (cool-down)
        self.optimizer.finish_param_gather()
        self._set_grad_sync(run, enabled=closes_window)
        output = item.output_tensor
        if item.replay is not None:
            output = self._recompute_forward(run, item)
        input_grad = compat.backward_step(item.input_tensor, output, grad, run.model_type,
                                          run.config)
        drift = self.state.version - item.version
        if self.telemetry is not None:
            self.telemetry.record(action.index, drift, self.accumulation)
        if not run.first:
            self._outbox[("grad", action.index)] = input_grad
        if _per_token_loss(run.config):
            self._count_tokens(action.index, item, run)

    def _count_tokens(self, j: int, item: "_InFlight", run: _Run) -> None:
        """``--calculate-per-token-loss``: add micro-batch ``j``'s token count to the window's
        and pass it on to the previous stage with ``j``'s gradient. The last stage has it
        from its loss function; the others received it with the gradient. Megatron sums the
        same counts over its iteration and broadcasts the sum from the last stage
        (``finalize_model_grads``); here each stage adds them up as they arrive."""
        if run.last:
            # a loss function's count on the host (an int, or Megatron's CPU default)
            # is copied without a host wait
            count = torch.as_tensor(item.num_tokens, dtype=torch.int).reshape(1).to(
                run.p2p.device, non_blocking=True)
        else:
            count = self._token_inbox.pop(j)
        if self._window_tokens is None:
            self._window_tokens = torch.zeros([], dtype=torch.int, device=run.p2p.device)
        self._window_tokens += count[0]
        if not run.first:
            self._token_outbox[j] = count

    def _set_grad_sync(self, run: _Run, enabled: bool) -> None:
        """Megatron's ``no_sync``: DP grad reduction only for the window's last backward."""
        if enabled and self._no_sync_ctx is not None:
            self._no_sync_ctx.__exit__(None, None, None)
            self._no_sync_ctx = None
        elif not enabled and self._no_sync_ctx is None:
            no_sync = run.config.no_sync_func or getattr(run.model, "no_sync", None)
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
    """A snapshot of every RNG a forward draws from: the CPU and CUDA default generators and
    the model-parallel tracker's states, copied (a tracker made CUDA-graph-safe keeps
    ``torch.Generator`` objects that go on drawing; its snapshot is a ``clone_state()``)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, _copy_states(get_cuda_rng_tracker().get_states())


def _set_rng_state(state) -> None:
    """Restore a :func:`_rng_state` snapshot (which stays valid for another restore)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    cpu, cuda, tracker = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    get_cuda_rng_tracker().set_states(_copy_states(tracker))


def _copy_states(states: Dict[str, Any]) -> Dict[str, Any]:
    return {name: state.clone_state() if isinstance(state, torch.Generator) else state.clone()
            for name, state in states.items()}


def _per_token_loss(config) -> bool:
    """Megatron's ``calculate_per_token_loss``: gradients scaled by the token count."""
    return bool(getattr(config, "calculate_per_token_loss", False))


def _name(tensor) -> str:
    kind, j = tensor
    return f"{'activation' if kind == 'act' else 'gradient'} of micro-batch {j}"


def get_forward_backward_func(
    optimizer: PACIOptimizer,
    paci: Union[Settings, PACIConfig, None] = None,
) -> PACISchedule:
    """PACI's counterpart of megatron-core's ``get_forward_backward_func()``.

    Returns a :class:`PACISchedule` bound to the stage's optimizer wrapper; call it with
    the keywords Megatron's training loop passes, and ``.drain()`` it before evaluation
    outside the schedule, checkpoint saving and exit (``.finish()`` at the end).
    """
    return PACISchedule(optimizer, paci)


def build(optimizer, model, settings: Settings, opt_param_scheduler=None,
          distributed_optimizer: Optional[bool] = None) -> PACISchedule:
    """The stage's optimizer wrapper and schedule from resolved settings, as both front
    ends build them: ``build(...).optimizer`` is the :class:`PACIOptimizer` the training
    loop steps, the returned :class:`PACISchedule` its ``forward_backward_func``.

    Args:
        optimizer: what megatron-core's ``get_megatron_optimizer`` returned.
        model: the stage's model chunks (megatron-core ``DistributedDataParallel``).
        settings: :meth:`PACIConfig.resolve`'s (or ``config.resolve_arguments``').
        opt_param_scheduler: Megatron's ``OptimizerParamScheduler``, or None.
        distributed_optimizer: as :class:`PACIOptimizer` (None: detected).

    Raises:
        PACIConfigError, PACICommunicationError: as :class:`PACIOptimizer`.
    """
    wrapped = PACIOptimizer(optimizer, model, opt_param_scheduler=opt_param_scheduler,
                            distributed_optimizer=distributed_optimizer,
                            skip_nonfinite_updates=settings.skip_nonfinite_updates,
                            lookahead=settings.lookahead)
    return PACISchedule(wrapped, settings)
