"""Megatron-LM glue: ``--pipeline-schedule paci`` on Megatron-LM's own training loop.

Activated by :mod:`paci_megatron.hook`, with no edit to Megatron-LM. Right after Python
executes Megatron-LM's modules it rebinds the names listed in :data:`PATCHED`
(docs/design.md, "Megatron-LM's training loop"):

- ``megatron.training.arguments``: PACI's flags are added (:func:`add_arguments`) and the
  validated arguments checked (:func:`check_args`: every refusal of
  :mod:`paci_megatron.config`, before anything is built); under ``paci`` the rerun state
  machine defaults to ``--rerun-mode disabled`` (it re-runs whole iterations);
- ``megatron.training.training``: the optimizer is wrapped in
  :class:`~paci_megatron.optimizer.PACIOptimizer` with the stage's
  :class:`~paci_megatron.schedule.PACISchedule` as ``forward_backward_func``;
  ``finalize_model_grads`` becomes the stage-local one; evaluation, saving, the exit and
  the end of training drain first; ``train_step`` counts iterations; ``training_log`` adds
  the drift per stage; the end of training finishes the schedule (which writes
  ``--paci-trace``). PACI's settings are resolved once, when the arguments are validated.

With ``--pipeline-schedule 1f1b`` (or without the flag) every rebound function calls
Megatron-LM's original unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["PATCHED", "add_arguments", "resolve", "check_args", "register", "Glue", "glue"]



def add_arguments(parser):
    """Add ``--pipeline-schedule`` and PACI's flags (:meth:`PACIConfig.add_arguments`) to
    Megatron-LM's parser, unless the script defines one of them itself (the glue then
    stays off and says so).

    Returns:
        ``parser`` (Megatron's argument-group functions return it).
    """
    from .config import PACIConfig

    flags = ["--pipeline-schedule"] + [flag for _, flag, _ in PACIConfig.flag_fields()]
    taken = [f for f in flags if f in getattr(parser, "_option_string_actions", {})]
    if taken:
        print(f"paci-megatron: this script defines {', '.join(taken)} itself; the PACI glue "
              "stays off (PACI_MEGATRON_DISABLE=1 silences this)", file=sys.stderr, flush=True)
        glue.disabled = True
        return parser
    return PACIConfig.add_arguments(parser)


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _num_microbatches(args) -> int:
    """Micro-batches per iteration at the start of training (a step batch-size schedule's
    first; Megatron-LM sets ``--global-batch-size`` to one micro-batch per DP rank there)."""
    steps = _batch_steps(args) if getattr(args, "step_batch_size_schedule", None) else []
    if steps:
        return steps[0][3]
    dp = getattr(args, "data_parallel_size", None) or 1
    return int(args.global_batch_size // (args.micro_batch_size * dp))


def resolve(args, argv: Optional[Sequence[str]] = None):
    """PACI's settings from Megatron-LM's validated arguments, resolved once
    (:func:`paci_megatron.config.resolve_arguments`, every refusal of
    :data:`paci_megatron.config.REFUSALS` checked on the arguments); None under ``1f1b``.

    Side effect: under ``paci`` with no ``--rerun-mode`` on the command line, sets
    ``args.rerun_mode = "disabled"``.

    Raises:
        PACIConfigError: every problem, each naming the flag to change.
    """
    from .config import resolve_arguments

    from .config import PACIConfigError

    argv = list(sys.argv if argv is None else argv)
    paci = getattr(args, "pipeline_schedule", "1f1b") == "paci"
    if paci and not _given(argv, "--rerun-mode"):
        args.rerun_mode = "disabled"
    settings = resolve_arguments(
        args, num_microbatches=_num_microbatches(args) if paci else 0,
        pipeline_model_parallel_size=int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
        lr_warmup_iters=_lr_warmup_iters(args), argv=argv)
    problems: List[str] = []
    # every m the batch-size schedule reaches within training passes PACI's rules
    for m in sorted({m for _, _, _, m in _batch_steps(args, within_training=True) if m}
                    if settings is not None else ()):
        try:
            settings.for_microbatches(m, training_args=args)
        except PACIConfigError as err:
            problems += [f"{_batch_schedule_flag(args)}: at {m} micro-batches per iteration: "
                         f"{p}" for p in err.problems if p not in problems]
    if problems:
        raise PACIConfigError(problems)
    return settings


def _batch_schedule_flag(args) -> Optional[str]:
    """The flag that changes the batch size during training, or None."""
    if getattr(args, "step_batch_size_schedule", None):
        return "--step-batch-size-schedule"
    return "--rampup-batch-size" if getattr(args, "rampup_batch_size", None) else None


def _batch_steps(args, within_training: bool = False) -> List[Tuple[int, int, int, int]]:
    """Megatron-LM's batch-size changes (``--step-batch-size-schedule``, or the
    ``--rampup-batch-size`` ramp that megatron-core up to 0.17 follows):
    ``(iteration, samples consumed before it, global batch, m)`` at each change
    (:func:`paci_megatron.compat.batch_size_steps`); [] for a constant batch.
    ``within_training``: only the changes before ``--train-iters`` / ``--train-samples``.

    Raises:
        PACIConfigError: megatron-core's calculator refuses the schedule.
    """
    from .compat import batch_size_steps
    from .config import PACIConfigError

    flag = _batch_schedule_flag(args)
    if flag is None:
        return []
    schedule = getattr(args, "step_batch_size_schedule", None)
    try:
        steps = batch_size_steps(
            int(args.micro_batch_size), int(getattr(args, "data_parallel_size", None) or 1),
            global_batch_size=int(args.global_batch_size or 0),
            rampup_batch_size=None if schedule else [int(x) for x in args.rampup_batch_size],
            step_batch_size_schedule=schedule, seq_length=getattr(args, "seq_length", None),
            decrease_batch_size_if_needed=bool(getattr(args, "decrease_batch_size_if_needed",
                                                       False)))
    except ValueError as err:
        raise PACIConfigError([f"{flag}: {err}"]) from None
    if within_training:
        iters = getattr(args, "train_iters", None)
        samples = getattr(args, "train_samples", None)
        steps = [step for step in steps if (not iters or step[0] < iters)
                 and (iters or not samples or step[1] < samples)]
    return steps


def check_args(args, argv: Optional[Sequence[str]] = None) -> List[str]:
    """Problems that stop a Megatron-LM run before training, each naming the flag to change
    (:func:`resolve`'s, as a list).

    Args:
        args: Megatron-LM's parsed and validated arguments (``argparse.Namespace``).
        argv: the command line (default ``sys.argv``), to tell flags given explicitly
            from defaults.

    Returns:
        The list of problems (empty when the run may start). Without ``paci`` in the
        arguments the only possible problems are a PACI flag given without it, or ``paci``
        on the command line that the arguments lost (``--yaml-cfg`` replaces them).

    Side effect: as :func:`resolve`.
    """
    from .config import PACIConfigError

    try:
        resolve(args, argv)
    except PACIConfigError as err:
        return err.problems
    return []


def _lr_warmup_iters(args) -> int:
    """Megatron-LM's learning-rate warm-up in iterations (from whichever flag set it; in
    samples for sample-based training, counted through a batch-size ramp's iterations)."""
    train_iters = getattr(args, "train_iters", 0) or 0
    if getattr(args, "lr_warmup_fraction", None) and train_iters:
        return int(args.lr_warmup_fraction * train_iters)
    if getattr(args, "lr_warmup_iters", 0):
        return int(args.lr_warmup_iters)
    samples = getattr(args, "lr_warmup_samples", 0) or 0
    if getattr(args, "lr_warmup_fraction", None):  # sample-based: Megatron-LM's samples
        decay = getattr(args, "lr_decay_samples", None) or getattr(args, "train_samples", 0) or 0
        samples = int(args.lr_warmup_fraction * decay)
    steps = _batch_steps(args) or [(0, 0, max(getattr(args, "global_batch_size", 1) or 1, 1), 0)]
    for k, (iteration, consumed, batch, _) in enumerate(steps):
        # the iterations that start before the warm-up's samples are consumed
        if k + 1 == len(steps) or samples <= steps[k + 1][1]:
            return iteration + max(-(-(samples - consumed) // batch), 0)
    raise AssertionError("unreachable")  # pragma: no cover


def _rank() -> int:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _print_last(text: str) -> None:
    """Print on the last rank, where Megatron-LM prints its training log."""
    import torch

    dist = torch.distributed
    if dist.is_initialized() and dist.get_rank() != dist.get_world_size() - 1:
        return
    print(text, flush=True)


class Glue:
    """State of the Megatron-LM glue in one process.

    Attributes:
        active: True once arguments with ``--pipeline-schedule paci`` were validated.
        args: Megatron-LM's arguments (after validation).
        optimizer: the stage's :class:`~paci_megatron.optimizer.PACIOptimizer`.
        schedule: the stage's :class:`~paci_megatron.schedule.PACISchedule`.
        settings: PACI's :class:`~paci_megatron.config.Settings`, resolved once when the
            arguments were validated.
        start_iteration: the iteration training started (or resumed) from.
        train_steps: ``train_step`` calls made under PACI in this process.
        drains: drains Megatron-LM's loop asked for, by reason (``evaluation``,
            ``checkpoint``, ``exit``, ``end of training``; the schedule's own, after the
            synchronous warm-up's iterations and every ``--paci-drain-interval``, are its).
    """

    def __init__(self) -> None:
        self.active = False
        self.disabled = False  # the script defines --pipeline-schedule itself
        self.evaluation_only = False  # Megatron built no optimizer (--skip-train)
        self.args = None
        self.settings = None
        self.optimizer = None
        self.schedule = None
        self.start_iteration = 0
        self.start_version = 0
        self.train_steps = 0
        self.drains: Dict[str, int] = {}
        self.replans_reported = 0  # the schedule's changes of m printed so far

    @property
    def iteration(self) -> int:
        """The training iteration the schedule has completed (Megatron's count)."""
        return self.start_iteration + self.train_steps

    def drain(self, why: str) -> None:
        """Drain the PACI pipeline (every rank calls it at the same point)."""
        if self.active and self.schedule is not None:
            self.schedule.drain()
            self.drains[why] = self.drains.get(why, 0) + 1

    def wrap_optimizer(self, model, optimizer, opt_param_scheduler):
        """Wrap Megatron's optimizer and create the stage's schedule (after loading)."""
        from megatron.core import parallel_state as ps
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        from .config import PACIConfigError, Setup, refuse
        from .plan import drift_bound
        from .schedule import PACISchedule, build

        args, settings = self.args, self.settings
        m = get_num_microbatches()
        if m != settings.num_microbatches:
            settings = self.settings = settings.for_microbatches(m)
        a = settings.accumulation
        self.start_iteration = int(getattr(args, "iteration", 0) or 0)
        # Megatron-LM restores the samples consumed; a changed batch size keeps them exact
        per_microbatch = args.micro_batch_size * (getattr(args, "data_parallel_size", 1) or 1)
        consumed = int(getattr(args, "consumed_train_samples", 0) or 0)
        if consumed % per_microbatch:
            _report_and_exit([f"the checkpoint consumed {consumed} samples, which are not whole "
                              f"micro-batches of {per_microbatch} samples: resume with the "
                              "checkpoint's --micro-batch-size"])
        microbatches = consumed // per_microbatch
        ramp = _batch_schedule_flag(args) is not None
        try:  # (a ramp's windows had other sizes: its drained checkpoints need not be whole
            # windows of today's a)
            refuse(Setup(settings.config, m, settings.num_stages,
                         consumed_microbatches=None if ramp else microbatches))
        except PACIConfigError as err:
            _report_and_exit(err.problems)
        self.start_version = microbatches // a
        self.schedule = build(optimizer, model, settings, opt_param_scheduler=opt_param_scheduler,
                              distributed_optimizer=bool(getattr(args, "use_distributed_optimizer",
                                                                 False)))
        self.optimizer = self.schedule.optimizer
        # Checkpoints are only written drained (save_checkpoint_and_time drains first).
        self.schedule.load_state_dict(
            PACISchedule.drained_state(microbatches, a, self.start_iteration,
                                       whole_windows=not ramp))
        P = ps.get_pipeline_model_parallel_world_size()
        s = ps.get_pipeline_model_parallel_rank()
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            print(f"paci-megatron: stage {s} of {P}: PACI schedule active "
                  f"(accumulation a = {a} of m = {m} micro-batches, drift bound "
                  f"{drift_bound(P, s, a)}, starting at iteration {self.start_iteration}, "
                  f"version {self.schedule.state.version}, synchronous warm-up "
                  f"{settings.sync_warmup_iters} iterations, look-ahead {settings.lookahead})",
                  flush=True)
        return self.optimizer

    def stage_summaries(self) -> List[Dict[str, Any]]:
        """Every stage's drift summary and update count, gathered over the pipeline group.

        A collective over the pipeline group: call it on every rank at the same point.
        """
        from megatron.core import parallel_state as ps

        from .telemetry import gather_stages

        local = {"drift": None, "updates": 0, "calls": self.train_steps}
        if self.schedule is not None:
            t = self.schedule.telemetry
            local["drift"] = None if t is None else t.summary()
            local["skipped"] = len(self.optimizer.skipped_updates)
            version = self.schedule.state.version
            local["updates"] = version - self.start_version - local["skipped"]
            local.update(version=version, grad_norm=self.optimizer.last_grad_norm,
                         lr=self.optimizer.last_lr)
        return gather_stages(local, ps.get_pipeline_model_parallel_group(), "PACI statistics")

    def log_line(self, writers=()) -> str:
        """``paci | iteration N | drift_max per stage: [...] | ...`` (a collective). Also
        writes ``paci/{drift_max,drift_mean,grad_norm,lr}/stage_S`` (and, with tied embeddings,
        ``paci/tied_lag_max/stage_{P-1}``) to Megatron-LM's
        TensorBoard and W&B writers in ``writers`` (None where not configured)."""
        rows = self.stage_summaries()
        scalars = {f"paci/{key}/stage_{s}": value for s, r in enumerate(rows) for key, value in (
            ("drift_max", r["drift"] and r["drift"]["max"]),
            ("drift_mean", r["drift"] and r["drift"]["mean"]),
            ("grad_norm", r.get("grad_norm")), ("lr", r.get("lr")),
            ("tied_lag_max", r["drift"] and r["drift"].get("tied_lag", {}).get("max")))
            if value is not None}
        tensorboard, wandb = (list(writers) + [None, None])[:2]
        for name, value in scalars.items() if tensorboard is not None else ():
            tensorboard.add_scalar(name, float(value), self.iteration)
        if wandb is not None:
            wandb.log({k: float(v) for k, v in scalars.items()}, self.iteration)
        drift_max = [r["drift"]["max"] if r["drift"] else 0 for r in rows]
        drift_mean = [round(float(r["drift"]["mean"]), 4) if r["drift"] else 0.0 for r in rows]
        versions = [r.get("version", 0) for r in rows]
        tied = [r["drift"]["tied_lag"]["max"] for r in rows if r["drift"] and "tied_lag" in r["drift"]]
        return (f" paci | iteration {self.iteration} | drift_max per stage: {drift_max} | "
                f"drift_mean per stage: {drift_mean} | version per stage: {versions} |"
                + (f" tied embedding lag max: {tied[0]} |" if tied else ""))


glue = Glue()


# --------------------------------------------------------------------------- patches
def _wrap(module, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(module, name)
    if getattr(original, "__paci_original__", None) is not None:
        return  # already patched
    patched = make(original)
    patched.__paci_original__ = original
    patched.__name__ = getattr(original, "__name__", name)
    patched.__doc__ = getattr(original, "__doc__", None)
    setattr(module, name, patched)


def _report_and_exit(problems: List[str]) -> None:
    if _rank() == 0:
        lines = "\n".join(f"  - {p}" for p in problems)
        print(f"paci-megatron: this run cannot start ({len(problems)} problem(s)):\n{lines}",
              file=sys.stderr, flush=True)
    sys.exit(2)


def _accept(args) -> None:
    """Check validated arguments (exit with the problems) and record the schedule."""
    if glue.disabled:
        return
    from .config import PACIConfigError

    try:
        glue.settings = resolve(args)
    except PACIConfigError as err:
        _report_and_exit(err.problems)
    glue.args = args
    glue.active = glue.settings is not None
    if glue.active and _rank() == 0:
        print(f"paci-megatron: --pipeline-schedule paci (rerun mode {args.rerun_mode})",
              flush=True)


def _validated(original):
    def validate_args(args, *a, **k):
        result = original(args, *a, **k)
        _accept(args)
        return result

    return validate_args


def _patch_arguments(module) -> None:
    def make_add(original):
        def _add_distributed_args(parser):
            return add_arguments(original(parser))

        return _add_distributed_args

    _wrap(module, "_add_distributed_args", make_add)
    _wrap(module, "validate_args", _validated)


def _patch_initialize(module) -> None:
    if hasattr(module, "validate_args"):
        arguments = sys.modules.get("megatron.training.arguments")
        wrapped = getattr(arguments, "validate_args", None)
        if wrapped is not None and getattr(wrapped, "__paci_original__", None) is not None:
            module.validate_args = wrapped
        else:
            _wrap(module, "validate_args", _validated)


def _print_summary() -> None:
    rows = glue.stage_summaries()
    _print_last(
        f"paci-megatron: stopped at iteration {glue.iteration} with the PACI schedule: "
        f"train_step calls per stage {[r['calls'] for r in rows]}, local updates per stage "
        f"{[r['updates'] for r in rows]}, drift_max per stage "
        f"{[r['drift']['max'] if r['drift'] else 0 for r in rows]}, drains {glue.drains}"
        + (f", skipped non-finite updates per stage {[r.get('skipped', 0) for r in rows]}"
           if any(r.get("skipped") for r in rows) else ""))
    written = glue.schedule.finish() if glue.schedule is not None else None  # every rank
    if written is not None:
        print(f"paci-megatron: trace of {written} actions written to {glue.settings.config.trace}",
              flush=True)


# Each maker takes Megatron-LM's module and its original function and returns the
# replacement; under 1f1b every replacement calls the original unchanged.
def _setup_model_and_optimizer(module, original):
    def setup_model_and_optimizer(*a, **k):
        args = module.get_args() if hasattr(module, "get_args") else None
        if args is not None and glue.args is not args:
            _accept(args)  # arguments that skipped validate_args (e.g. --yaml-cfg)
        if "muon" in str(getattr(args, "optimizer", "")):  # under 1f1b as well
            from . import compat

            compat.muon_module()  # Megatron-LM's own Muon, usable on this Python
        model, optimizer, scheduler = original(*a, **k)
        if glue.active and optimizer is None:
            glue.evaluation_only = True  # --skip-train: evaluation alone, no schedule needed
        elif glue.active:
            optimizer = glue.wrap_optimizer(model, optimizer, scheduler)
        return model, optimizer, scheduler

    return setup_model_and_optimizer


def _get_forward_backward_func(module, original):
    def get_forward_backward_func(*a, **k):
        if not glue.active or (glue.schedule is None and glue.evaluation_only):
            return original(*a, **k)  # forward-only evaluation is the same in both
        from .config import Setup, refuse

        refuse(Setup(collections=(k.get("schedule_pg_collection"),)))
        if glue.schedule is None:
            raise RuntimeError("paci-megatron: the PACI schedule is requested before "
                               "setup_model_and_optimizer built the optimizer")
        return glue.schedule

    return get_forward_backward_func


def _finalize_model_grads(module, original):
    from .optimizer import finalize_stage_grads

    def finalize_model_grads(model, *a, **k):
        return (finalize_stage_grads if glue.active else original)(model, *a, **k)

    return finalize_model_grads


def _train_step(module, original):
    def train_step(*a, **k):
        result = original(*a, **k)
        if glue.active:
            glue.train_steps += 1
            _report_replans()
        return result

    return train_step


_CHANGES = {"--rampup-batch-size": "batch-size ramp-up",
            "--step-batch-size-schedule": "step batch-size schedule", None: "batch size"}


def _report_replans() -> None:
    """A batch-size schedule's changes of ``m``, once each, on the last rank."""
    from .plan import drift_bound

    schedule = glue.schedule
    if schedule is None or len(schedule.replans) <= glue.replans_reported:
        return
    P = schedule.settings.num_stages
    for change in schedule.replans[glue.replans_reported:]:
        a = change["accumulation"]
        _print_last(f"paci-megatron: iteration {change['iteration'] + 1}: "
                    f"{change['from_m']} -> {change['to_m']} micro-batches per iteration "
                    f"({_CHANGES[_batch_schedule_flag(glue.args)]}): accumulation a = {a}, "
                    f"drift bound per stage "
                    f"{[drift_bound(P, s, a) for s in range(P)]}"
                    + (", drained first" if change["drained"] else ""))
    glue.replans_reported = len(schedule.replans)


def _training_log(module, original):
    def training_log(*a, **k):
        result = original(*a, **k)
        interval = glue.args.log_interval if glue.active else 0
        if interval and glue.iteration % interval == 0:
            from megatron.training import global_vars

            _print_last(glue.log_line((global_vars.get_tensorboard_writer(),
                                       global_vars.get_wandb_writer())))
        return result

    return training_log


def _drain_first(why: str):
    def make(module, original):
        def drained_first(*a, **k):
            glue.drain(why)
            return original(*a, **k)

        return drained_first

    return make


def _checkpoint_and_decide_exit(module, original):
    def checkpoint_and_decide_exit(*a, **k):
        should_exit = original(*a, **k)
        if should_exit and glue.active:
            glue.drain("exit")
            _print_summary()
        return should_exit

    return checkpoint_and_decide_exit


def _train(module, original):
    def train(*a, **k):
        result = original(*a, **k)
        if glue.active:
            glue.drain("end of training")
            _print_summary()
        return result

    return train


_TRAINING_PATCHES = {
    "setup_model_and_optimizer": _setup_model_and_optimizer,
    "get_forward_backward_func": _get_forward_backward_func,
    "finalize_model_grads": _finalize_model_grads,
    "train_step": _train_step,
    "training_log": _training_log,
    "evaluate": _drain_first("evaluation"),
    "save_checkpoint_and_time": _drain_first("checkpoint"),
    "checkpoint_and_decide_exit": _checkpoint_and_decide_exit,
    "train": _train,
}


#: Megatron-LM module -> names this module rebinds there (documentation and tests).
PATCHED: Dict[str, Sequence[str]] = {
    "megatron.training.arguments": ("_add_distributed_args", "validate_args"),
    "megatron.training.initialize": ("validate_args",),
    "megatron.training.training": tuple(_TRAINING_PATCHES),
}


def _patch_training(module) -> None:
    for name, make in _TRAINING_PATCHES.items():
        _wrap(module, name, lambda original, make=make: make(module, original))


def register(hook) -> None:
    """Register the Megatron-LM patches on a :class:`paci_megatron.hook.PostImportHook`."""
    hook.register("megatron.training.arguments", _patch_arguments)
    hook.register("megatron.training.initialize", _patch_initialize)
    hook.register("megatron.training.training", _patch_training)
