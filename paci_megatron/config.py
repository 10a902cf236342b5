"""PACI's settings, their command-line flags, and every refusal of a setup PACI cannot run.

:class:`PACIConfig` is the one home of PACI's settings: each field that has a flag declares
it once (:func:`PACIConfig.add_arguments` adds them all to a parser, with
``--pipeline-schedule``; :func:`PACIConfig.from_args` reads them back), and both front ends
(``examples/pretrain_gpt.py`` and the Megatron-LM glue) use it, so a flag cannot exist on
one side only. :data:`REFUSALS` is the table of ``(condition, message)`` checks, whichever
front end asks; :func:`validate_setup` and :func:`check_arguments` evaluate it and raise /
return every violation at once with what to change (docs/design.md, "What stays
stage-local, what is refused").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .plan import drift_bound

__all__ = ["SCHEDULES", "MEMORY_MODES", "PACIConfig", "PACIConfigError", "Setup", "Settings",
           "REFUSALS", "problems", "refuse", "validate_setup", "resolve_arguments",
           "check_arguments", "divisors", "unwritable_file", "unwritable_folder"]

SCHEDULES = ("1f1b", "paci")
MEMORY_MODES = ("activations", "recompute")
GROUP_TITLE = "pipeline schedule (paci-megatron)"


class PACIConfigError(ValueError):
    """A Megatron configuration PACI cannot run. ``problems`` lists each violation."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"PACI cannot run this configuration ({len(problems)} problem(s)):\n{lines}")


def _flag(default: Any, flag: str, help: str, **argparse_kw: Any):
    """A :class:`PACIConfig` field with its command-line flag (``--paci-*``)."""
    return field(default=default, metadata={"flag": flag, "help": help, **argparse_kw})


@dataclass
class PACIConfig:
    """Settings of the PACI schedule. Each field with a flag is documented by that flag's
    help (``--paci-<field>``, :meth:`add_arguments`); in short:

    Attributes:
        accumulation: ``a``, backwards per local update; ``None``: ``a = m``.
        drain_interval: also drain every N iterations (0: only at evaluation, save, exit).
        max_drift: refuse a bound ``ceil((P-1)/a)`` above this (``None``: no limit).
        memory_mode: ``"activations"`` (as 1F1B) or ``"recompute"`` (keep each stage input,
            recompute the forward with the weights current at backward time).
        skip_nonfinite_updates: skip and report an update with NaN/Inf gradients.
        sync_warmup_iters: drain after each of the first N iterations (exactly 1F1B);
            ``None``: the front ends use the LR warm-up (a bare ``PACISchedule`` uses 0).
        lookahead: scale ``c`` of the look-ahead of
            :class:`~paci_megatron.optimizer.PACIOptimizer` (0: off).
        trace: path of the run's Chrome / Perfetto trace.
        p2p_timeout_s: longest wait of one send/receive, seconds (front ends: from
            ``--distributed-timeout-minutes``).
        check_drift: raise if a measured drift ever exceeds the bound.
    """

    accumulation: Optional[int] = _flag(
        None, "--paci-accumulation", type=int,
        help="backward micro-batches each stage accumulates per local update (default: the "
             "micro-batches of one iteration); must divide them")
    drain_interval: int = _flag(
        0, "--paci-drain-interval", type=int,
        help="drain the pipeline every N iterations (default 0: only before evaluation, "
             "checkpoint saving and exit)")
    max_drift: Optional[int] = _flag(
        None, "--paci-max-drift", type=int,
        help="refuse settings whose drift bound ceil((P-1)/a) exceeds this")
    memory_mode: str = _flag(
        "activations", "--paci-memory-mode", choices=MEMORY_MODES,
        help="activations: keep each in-flight micro-batch's activations (as 1F1B); "
             "recompute: keep the stage input only and recompute the forward at backward")
    skip_nonfinite_updates: bool = _flag(
        False, "--paci-skip-nonfinite-updates", action="store_true",
        help="skip (and report) a stage's update whose gradients hold NaN/Inf instead of "
             "stopping")
    sync_warmup_iters: Optional[int] = _flag(
        None, "--paci-sync-warmup-iters", type=int,
        help="drain after each of the first N iterations, so they train exactly as 1F1B "
             "(default: the learning-rate warm-up iterations; 0: PACI from the start)")
    lookahead: float = _flag(
        0.0, "--paci-lookahead", type=float,
        help="delay correction: each stage's weights look ahead by SCALE x its mean drift "
             "updates along its last update (0: off; one fp32 buffer per parameter)")
    trace: Optional[str] = _flag(
        None, "--paci-trace",
        help="write the run's timeline (every forward, backward and local update of every "
             "stage) as a Chrome/Perfetto trace to this file")
    p2p_timeout_s: float = 600.0
    check_drift: bool = True

    def resolve_accumulation(self, num_microbatches: int) -> int:
        """``a`` for an iteration of ``num_microbatches`` micro-batches."""
        return self.accumulation if self.accumulation is not None else num_microbatches

    def resolve_sync_warmup(self, lr_warmup_iters: int) -> "PACIConfig":
        """This config with ``sync_warmup_iters`` set (the LR warm-up where it is None)."""
        if self.sync_warmup_iters is not None:
            return self
        return replace(self, sync_warmup_iters=max(int(lr_warmup_iters or 0), 0))

    def resolve(self, *, num_microbatches: int, pipeline_model_parallel_size: int,
                lr_warmup_iters: Optional[int] = None, tied: bool = False, model_config=None,
                training_args=None) -> "Settings":
        """These settings for a run of ``m`` micro-batches per iteration on ``P`` stages,
        checked against every refusal (:data:`REFUSALS`) once: the frozen
        :class:`Settings` both front ends hand to the optimizer wrapper and the schedule.
        ``lr_warmup_iters``: the default of ``sync_warmup_iters`` (None: 0).

        Raises:
            PACIConfigError: listing every violation and the flag to change.
        """
        config = self.resolve_sync_warmup(lr_warmup_iters or 0)
        setup = Setup(config, num_microbatches, pipeline_model_parallel_size, tied, model_config,
                      training_args)
        refuse(setup)
        return Settings(config, num_microbatches, pipeline_model_parallel_size, setup.a,
                        config.sync_warmup_iters, tied)

    @staticmethod
    def flag_fields() -> List[Tuple[str, str, Any]]:
        """``(field name, flag, default)`` of every setting that has a flag."""
        return [(f.name, f.metadata["flag"], f.default) for f in fields(PACIConfig)
                if "flag" in f.metadata]

    @staticmethod
    def dest(flag: str) -> str:
        """argparse's attribute name of a flag (``--paci-max-drift`` -> ``paci_max_drift``)."""
        return flag[2:].replace("-", "_")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add ``--pipeline-schedule {1f1b,paci}`` and every ``--paci-*`` flag to ``parser``,
        in one argument group. Returns ``parser``."""
        group = parser.add_argument_group(title=GROUP_TITLE)
        group.add_argument(
            "--pipeline-schedule", choices=SCHEDULES, default="1f1b",
            help="1f1b: Megatron's own pipeline schedule (unchanged); paci: asynchronous 1F1B "
                 "without flush, each stage updating after --paci-accumulation backwards")
        for f in fields(PACIConfig):
            if "flag" in f.metadata:
                kw = {k: v for k, v in f.metadata.items() if k != "flag"}
                group.add_argument(f.metadata["flag"], default=f.default, **kw)
        return parser

    @classmethod
    def from_args(cls, args: Any) -> "PACIConfig":
        """Build from parsed arguments (any object with the flags' attributes).

        Missing attributes take the field defaults (a namespace that skipped the parser,
        such as one built from ``--yaml-cfg``); ``--distributed-timeout-minutes`` sets
        :attr:`p2p_timeout_s`.
        """
        values = {name: getattr(args, cls.dest(flag), default)
                  for name, flag, default in cls.flag_fields()}
        minutes = getattr(args, "distributed_timeout_minutes", None)
        if minutes is not None:
            values["p2p_timeout_s"] = 60.0 * float(minutes)
        return cls(**values)


def _nearest_existing(path: str) -> str:
    import os

    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def _cannot_write_in(folder: str) -> Optional[str]:
    """Why no file can be created in the existing ``folder`` (None if one can): tried, not
    read from permission bits, which a root user bypasses and a read-only file system
    such as ``/sys`` ignores. The probe file is removed at once."""
    import os
    import tempfile

    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".paci-write-probe-")
    except OSError as err:
        return f"{folder} is not writable ({err.strerror or err})"
    os.close(handle)
    os.remove(probe)
    return None


def unwritable_file(path: Optional[str]) -> Optional[str]:
    """Why a file cannot be written at ``path`` (None if it can, or no path was given)."""
    import os

    if not path:
        return None
    if os.path.isdir(path):
        return "is a folder: give a file name"
    return _cannot_write_in(_nearest_existing(os.path.dirname(os.path.abspath(path))))


def unwritable_folder(path: Optional[str]) -> Optional[str]:
    """Why files cannot be written under the folder ``path`` (None if they can, or no
    path was given): it, or the nearest existing folder above it, must be a folder in
    which a file can be created (not ``/sys/...``, nor a path under a regular file)."""
    if not path:
        return None
    return _cannot_write_in(_nearest_existing(path))


def divisors(n: int) -> List[int]:
    """Positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Setup:
    """What the refusals look at: PACI's settings and the Megatron setup around them. Every
    field may be absent (None / empty); a refusal whose inputs are absent does not apply,
    so the runtime can check what it alone sees (its process groups, its model chunks).

    Attributes:
        paci: the :class:`PACIConfig`. m: micro-batches per iteration. P: pipeline stages.
        tied: input embedding and output layer share weights.
        model_config: megatron-core ``TransformerConfig``, or None.
        training_args: the front end's parsed arguments (Megatron-LM's, or the example's),
            or None. Flags that exist in both under one name (``fp16``, ...) are read from
            the model config first (:meth:`value`).
        schedule: the ``--pipeline-schedule`` asked for; ``argv``: the command line.
        chunks: model chunks per stage. collections: the ``pg_collection`` /
            ``p2p_communicator`` objects Megatron passes a schedule call.
        consumed_microbatches: micro-batches a resumed run has consumed (None: a new run).
    """

    paci: PACIConfig = field(default_factory=PACIConfig)
    m: Optional[int] = None
    P: Optional[int] = None
    tied: bool = False
    model_config: Any = None
    training_args: Any = None
    schedule: str = "paci"
    argv: Sequence[str] = ()
    chunks: int = 1
    collections: Sequence[Any] = ()
    consumed_microbatches: Optional[int] = None

    @property
    def a(self) -> int:
        """The accumulation factor (1 where ``m`` is not valid)."""
        return self.paci.resolve_accumulation(self.m) if (self.m or 0) >= 1 else 1

    @property
    def shaped(self) -> bool:
        """``m``, ``a`` and ``P`` are known and valid."""
        return (self.m or 0) >= 1 and self.a >= 1 and (self.P or 0) >= 1

    def cfg(self, name: str, default: Any = None) -> Any:
        """``model_config.<name>`` (``default`` without a model config or attribute)."""
        return getattr(self.model_config, name, default) if self.model_config is not None else default

    def arg(self, name: str, default: Any = None) -> Any:
        """``training_args.<name>`` (``default`` without training arguments or attribute)."""
        return getattr(self.training_args, name, default) if self.training_args is not None else default

    def value(self, name: str) -> Any:
        """``name`` from the model config, else from the training arguments (Megatron-LM's
        arguments carry the ``TransformerConfig`` fields under the same names)."""
        got = self.cfg(name)
        return got if got is not None else self.arg(name)


def _max_drift_fix(s: Setup) -> str:
    fits = [d for d in divisors(s.m) if drift_bound(s.P, 0, d) <= s.paci.max_drift]
    if fits:
        return f"use --paci-accumulation {fits[0]} (or any of {fits})"
    return (f"no accumulation factor dividing m = {s.m} achieves it; the smallest bound is "
            f"{drift_bound(s.P, 0, s.m)}: raise --paci-max-drift or use --pipeline-schedule 1f1b")


def _virtual(s: Setup) -> bool:
    return (s.cfg("virtual_pipeline_model_parallel_size") not in (None, 1)
            or s.arg("num_virtual_stages_per_pipeline_rank") not in (None, 1)
            or s.arg("virtual_pipeline_model_parallel_size") not in (None, 1)
            or bool(s.arg("num_layers_per_virtual_pipeline_stage")))


def _multi_module(s: Setup) -> bool:
    """A megatron-core multi-module process-group collection or communicator (0.16+),
    recognised by class name (older releases lack them)."""
    return any(c.__name__.startswith("MultiModule") for o in s.collections
               for c in type(o).__mro__)


def _paci_flags_given(s: Setup) -> List[str]:
    return [flag for _, flag, default in PACIConfig.flag_fields()
            if s.arg(PACIConfig.dest(flag), default) != default]


def _paci_on_command_line(s: Setup) -> bool:
    argv = list(s.argv)
    return "--pipeline-schedule=paci" in argv or ("--pipeline-schedule", "paci") in zip(argv, argv[1:])


#: Tied embeddings with main parameters kept outside the optimizer's param groups.
TIED_PRECISION_AWARE = (
    "tied embeddings under PACI step the tied weight's main parameter through the optimizer's "
    "param groups, which --use-precision-aware-optimizer (and --optimizer-cpu-offload) keep "
    "elsewhere: remove it or add --untie-embeddings-and-output-weights")
Refusal = Tuple[Callable[[Setup], bool], Callable[[Setup], str]]

#: megatron-core's ``OptimizerConfig.overlap_param_gather_with_optimizer_step``: what it does
#: under PACI (refused by the optimizer wrapper, and for Megatron-LM's flag by check_args)
OVERLAP_WITH_STEP = (
    "starts the first model chunk's parameter all-gather inside optimizer.step(), where "
    "PACI's look-ahead and drains then write the weights that gather is still reading; "
    "--overlap-param-gather alone overlaps the gather with the next forward under PACI")

#: Megatron-LM flags whose work PACI would skip or get wrong: (argument, flag, what it does)
_LM_REFUSED = (
    ("overlap_param_gather_with_optimizer_step", "--overlap-param-gather-with-optimizer-step",
     OVERLAP_WITH_STEP),
    ("optimizer_cuda_graph", "--optimizer-cuda-graph",
     "replaces optimizer.step(), which PACI runs inside the schedule"),
    ("moe_expert_rank_capacity_factor", "--moe-expert-rank-capacity-factor",
     "re-runs iterations whose updates PACI has already applied"),
    ("save_wgrads_interval", "--save-wgrads-interval",
     "needs a whole iteration's gradients at once, which PACI's local updates consume"),
    ("freeze_all_layers", "--freeze-all-layers", "makes the training calls forward-only"),
)

#: Refusals that apply whatever the schedule: a front end's flags that contradict it.
_ANY_SCHEDULE: Sequence[Refusal] = (
    (lambda s: s.schedule != "paci" and bool(_paci_flags_given(s)),
     lambda s: (f"{', '.join(_paci_flags_given(s))} only "
                f"{'applies' if len(_paci_flags_given(s)) == 1 else 'apply'} with "
                f"--pipeline-schedule paci: add that or remove "
                f"{'it' if len(_paci_flags_given(s)) == 1 else 'them'}")),
    (lambda s: s.schedule != "paci" and _paci_on_command_line(s),
     lambda s: "--pipeline-schedule paci is on the command line but not in the arguments "
               "Megatron-LM uses (--yaml-cfg replaces them): put pipeline_schedule: paci in "
               "the YAML file"),
)

def _batch_flag(s: Setup) -> str:
    """The flag that sets the micro-batches per iteration (Megatron-LM's step batch-size
    schedule takes the place of --global-batch-size)."""
    if getattr(s.training_args, "step_batch_size_schedule", None):
        return "--step-batch-size-schedule"
    return "--global-batch-size"


#: Refusals of a PACI run: ``(condition, message)``, evaluated in order on a :class:`Setup`.
_PACI: Sequence[Refusal] = (
    (lambda s: s.m is not None and s.m < 1,
     lambda s: f"num_microbatches is {s.m}: need at least 1 (check {_batch_flag(s)})"),
    (lambda s: (s.m or 0) >= 1 and s.a < 1,
     lambda s: f"--paci-accumulation is {s.a}: must be >= 1"),
    (lambda s: (s.m or 0) >= 1 and s.a >= 1 and s.m % s.a != 0,
     lambda s: f"--paci-accumulation {s.a} does not divide the {s.m} micro-batches of an "
               f"iteration (fewer micro-batches than one accumulation window needs, or windows "
               f"that end mid-iteration): choose one of {divisors(s.m)}, or change "
               f"{_batch_flag(s)}"),
    (lambda s: s.P is not None and s.P < 1, lambda s: f"pipeline size is {s.P}: must be >= 1"),
    (lambda s: s.paci.max_drift is not None and s.paci.max_drift < 0,
     lambda s: f"--paci-max-drift {s.paci.max_drift}: must be >= 0"),
    (lambda s: (s.paci.max_drift is not None and s.paci.max_drift >= 0 and s.shaped
                and drift_bound(s.P, 0, s.a) > s.paci.max_drift),
     lambda s: f"drift bound ceil((P-1)/a) = {drift_bound(s.P, 0, s.a)} on stage 0 exceeds "
               f"--paci-max-drift {s.paci.max_drift}: {_max_drift_fix(s)}"),
    (lambda s: not s.paci.p2p_timeout_s > 0,
     lambda s: f"the pipeline send/receive timeout is {s.paci.p2p_timeout_s} s: must be > 0 "
               "(--distributed-timeout-minutes)"),
    (lambda s: s.paci.memory_mode not in MEMORY_MODES,
     lambda s: f"memory mode {s.paci.memory_mode!r} is unknown: use 'activations' or "
               "'recompute' (--paci-memory-mode)"),
    (lambda s: s.paci.drain_interval is not None and s.paci.drain_interval < 0,
     lambda s: f"--paci-drain-interval {s.paci.drain_interval}: must be >= 0"),
    (lambda s: s.paci.sync_warmup_iters is not None and s.paci.sync_warmup_iters < 0,
     lambda s: f"--paci-sync-warmup-iters {s.paci.sync_warmup_iters}: must be >= 0"),
    (lambda s: not 0.0 <= s.paci.lookahead <= 4.0,
     lambda s: f"--paci-lookahead {s.paci.lookahead}: must be between 0 (off) and 4"),
    (lambda s: (s.paci.sync_warmup_iters is not None and s.arg("train_iters") is not None
                and s.paci.sync_warmup_iters >= s.arg("train_iters") >= 1),
     lambda s: f"--paci-sync-warmup-iters {s.paci.sync_warmup_iters} drains after every one of "
               f"the {s.arg('train_iters')} iterations of --train-iters: the run would be plain "
               "1F1B; lower it (0: PACI from the start) or use --pipeline-schedule 1f1b"),
    (lambda s: unwritable_file(s.paci.trace) is not None,
     lambda s: f"--paci-trace {s.paci.trace}: {unwritable_file(s.paci.trace)}"),
    (lambda s: unwritable_folder(s.arg("save")) is not None,
     lambda s: f"--save {s.arg('save')}: {unwritable_folder(s.arg('save'))}: nothing could be "
               "saved; give a folder you can write"),
    (lambda s: (s.consumed_microbatches is not None and s.shaped
                and s.consumed_microbatches % s.a != 0),
     lambda s: f"the checkpoint consumed {s.consumed_microbatches} micro-batches, which are not "
               f"whole accumulation windows of a = {s.a} micro-batches: resume with the "
               "checkpoint's --global-batch-size and --micro-batch-size"),
    (lambda s: s.chunks != 1,
     lambda s: f"PACI runs one model chunk per stage, got {s.chunks}: remove virtual pipeline "
               "stages"),
    (_multi_module,
     lambda s: "a multi-module process-group collection or communicator (megatron-core's "
               "MultiModuleProcessGroupCollection / MultiModulePipelineCommunicator: several "
               "modules, such as an encoder and a language model, on separate pipeline grids) "
               "is not supported: PACI's stages each hold one chunk of one model; use "
               "--pipeline-schedule 1f1b"),
    # megatron-core sets pipeline_dtype itself in Megatron-LM: only a model config is asked
    (lambda s: s.model_config is not None and (s.P or 0) > 1 and s.cfg("pipeline_dtype") is None,
     lambda s: "the model config has no pipeline_dtype, the dtype of activations sent between "
               "stages: set TransformerConfig(pipeline_dtype=torch.float32 or torch.bfloat16) "
               "(Megatron-LM sets it from --bf16)"),
    (lambda s: bool(s.value("fp16")),
     lambda s: "--fp16 uses dynamic loss scaling that needs every stage to agree on overflow: "
               "use --bf16 (or fp32)"),
    (_virtual,
     lambda s: "virtual pipeline stages are not supported by PACI yet: remove "
               "--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank "
               "(--virtual-pipeline-model-parallel-size)"),
    (lambda s: bool(s.value("variable_seq_lengths")),
     lambda s: "variable sequence lengths are not supported by PACI yet: use a fixed --seq-length"),
    (lambda s: bool(s.value("fp8")),
     lambda s: "FP8 keeps a cached FP8 copy of each weight that a local update leaves stale: "
               "remove --fp8-format (use --bf16)"),
    (lambda s: bool(s.value("mtp_num_layers")),
     lambda s: "multi-token prediction (--mtp-num-layers) is not supported by PACI"),
    # finalize_model_grads all-reduces these across the pipeline stages at every update
    (lambda s: (s.P or 0) > 1 and bool(s.value("flextron")),
     lambda s: "Flextron's router gradients are all-reduced across pipeline stages at every "
               "update, which PACI has no point for: train Flextron with --pipeline-schedule 1f1b"),
    (lambda s: (s.P or 0) > 1 and bool(s.value("has_cond_embedder")),
     lambda s: "a conditional embedder's gradients (DiT) are all-reduced across pipeline "
               "stages at every update, which PACI has no point for: use --pipeline-schedule 1f1b"),
    # Megatron-LM turns p2p overlap on by itself with virtual stages (refused above) and its
    # non-interleaved schedule ignores it: only a model config given to PACI is asked
    (lambda s: bool(s.cfg("overlap_p2p_comm")),
     lambda s: "--overlap-p2p-communication is not supported by PACI: remove it"),
) + tuple(
    (lambda s, name=name: bool(s.value(name)),
     lambda s, flag=flag: f"{flag} is not supported by PACI: remove it")
    for flag, name in (("--delay-wgrad-compute", "delay_wgrad_compute"),
                       ("--defer-embedding-wgrad-compute", "defer_embedding_wgrad_compute"))
) + (
    # flags that exist only in Megatron-LM's training loop
    (lambda s: s.arg("rerun_mode") not in (None, "disabled"),
     lambda s: f"--rerun-mode {s.arg('rerun_mode')} re-runs whole iterations and all-reduces "
               "over the world after each one; under PACI the updates happen inside the schedule "
               "and cannot be re-run: use --rerun-mode disabled (the default with "
               "--pipeline-schedule paci)"),
    (lambda s: s.tied and (s.P or 0) > 1 and bool(s.arg("use_precision_aware_optimizer")),
     lambda s: TIED_PRECISION_AWARE),
    (lambda s: (s.arg("num_distributed_optimizer_instances") or 1) > 1,
     lambda s: f"--num-distributed-optimizer-instances "
               f"{s.arg('num_distributed_optimizer_instances')}: PACI reduces a stage's grad "
               "norm over all its data-parallel ranks, which would count each optimizer shard "
               "once per instance: remove it (use 1 instance)"),
) + tuple(
    (lambda s, name=name: bool(s.arg(name)), lambda s, flag=flag, does=does: f"{flag} {does}: "
     "remove it with PACI") for name, flag, does in _LM_REFUSED
) + tuple(
    (lambda s, name=name: bool(s.arg(name)),
     lambda s, flag=flag: f"{flag} is not supported by PACI: use --use-distributed-optimizer")
    for flag, name in (("--use-torch-fsdp2", "use_torch_fsdp2"),
                       ("--use-megatron-fsdp", "use_megatron_fsdp"),
                       ("--use-custom-fsdp", "use_custom_fsdp"))
) + (
    (lambda s: (s.arg("tensor_parallel_num_weight_shards") or 1) > 1,
     lambda s: "--tensor-parallel-num-weight-shards reduces replicated gradients (and scales the "
               "LR step) in Megatron's finalize_model_grads, which PACI replaces: remove it"),
    (lambda s: (s.arg("cuda_graph_impl", "none") not in (None, "none")
                or bool(s.arg("enable_cuda_graph")) or bool(s.arg("external_cuda_graph"))),
     lambda s: "CUDA graphs capture a fixed iteration; PACI's iterations differ in what is in "
               "flight: remove --cuda-graph-impl / --enable-cuda-graph / --external-cuda-graph"),
)

#: Every refusal, whichever front end or runtime asks: ``(condition, message)`` rows,
#: evaluated in order on a :class:`Setup` (those of a PACI run only under ``paci``).
REFUSALS: Sequence[Refusal] = _ANY_SCHEDULE + tuple(
    (lambda s, condition=condition: s.schedule == "paci" and condition(s), message)
    for condition, message in _PACI)


def problems(setup: Setup) -> List[str]:
    """The message of every row of :data:`REFUSALS` that applies to ``setup``."""
    return [message(setup) for condition, message in REFUSALS if condition(setup)]


def refuse(setup: Setup) -> None:
    """Raise :class:`PACIConfigError` with every problem of ``setup`` (nothing if none)."""
    found = problems(setup)
    if found:
        raise PACIConfigError(found)


@dataclass(frozen=True)
class Settings:
    """PACI's settings resolved for one run, once: what the optimizer wrapper and the
    schedule are handed (:meth:`PACIConfig.resolve`). Nothing below them reads a flag.

    Attributes:
        config: the :class:`PACIConfig` they come from (``sync_warmup_iters`` resolved).
        num_microbatches: ``m``. num_stages: ``P``. accumulation: ``a`` (divides ``m``).
        sync_warmup_iters: training calls that end with a drain (exactly 1F1B).
        tied: the model ties its input embedding and output layer across stages.
    """

    config: PACIConfig
    num_microbatches: int
    num_stages: int
    accumulation: int
    sync_warmup_iters: int
    tied: bool = False

    @property
    def lookahead(self) -> float:
        """The look-ahead's scale ``c`` (0: off)."""
        return self.config.lookahead

    @property
    def skip_nonfinite_updates(self) -> bool:
        """Skip an update with NaN/Inf gradients instead of stopping."""
        return self.config.skip_nonfinite_updates

    @property
    def drain_interval(self) -> int:
        """Drain after every N training calls (0: never on its own)."""
        return self.config.drain_interval or 0

    def for_microbatches(self, num_microbatches: int, model_config=None,
                         training_args=None) -> "Settings":
        """These settings for another ``m`` (the accumulation factor re-resolved, every
        refusal checked again; ``training_args`` as :class:`Setup`'s).

        Raises:
            PACIConfigError: as :meth:`PACIConfig.resolve`.
        """
        return self.config.resolve(num_microbatches=num_microbatches,
                                   pipeline_model_parallel_size=self.num_stages,
                                   model_config=model_config, tied=self.tied,
                                   training_args=training_args)


def validate_setup(
    paci: PACIConfig,
    *,
    num_microbatches: int,
    pipeline_model_parallel_size: int,
    model_config=None,
    share_embeddings_and_output_weights: bool = False,
    training_args=None,
) -> int:
    """Check a Megatron setup against every entry of :data:`REFUSALS` before training.

    ``num_microbatches`` is ``m`` = global batch / (micro batch x DP), ``P`` the pipeline
    size; ``model_config`` (a ``TransformerConfig``) and ``training_args`` (Megatron-LM's
    arguments) may be None, which skips their checks (see :class:`Setup`).

    Returns:
        The accumulation factor ``a`` to use.

    Raises:
        PACIConfigError: listing every violation and the flag to change.
    """
    return paci.resolve(num_microbatches=num_microbatches,
                        pipeline_model_parallel_size=pipeline_model_parallel_size,
                        model_config=model_config, tied=share_embeddings_and_output_weights,
                        training_args=training_args).accumulation


def resolve_arguments(args: Any, *, num_microbatches: int, pipeline_model_parallel_size: int,
                      lr_warmup_iters: Optional[int] = None, model_config=None,
                      argv: Sequence[str] = ()) -> Optional[Settings]:
    """A front end's settings from its parsed arguments, resolved once: None under
    ``--pipeline-schedule 1f1b``. ``args`` are also the rows' training arguments (tied
    embeddings from ``--untie-embeddings-and-output-weights``).

    Raises:
        PACIConfigError: every refusal that applies (a ``--paci-*`` flag without
            ``--pipeline-schedule paci`` included).
    """
    schedule = getattr(args, "pipeline_schedule", "1f1b")
    tied = not getattr(args, "untie_embeddings_and_output_weights", False)
    config = PACIConfig.from_args(args)
    if schedule != "paci":
        refuse(Setup(config, training_args=args, schedule=schedule, argv=argv))
        return None
    return config.resolve(num_microbatches=num_microbatches,
                          pipeline_model_parallel_size=pipeline_model_parallel_size,
                          lr_warmup_iters=lr_warmup_iters, tied=tied,
                          model_config=model_config, training_args=args)


def check_arguments(args: Any, *, num_microbatches: int, pipeline_model_parallel_size: int,
                    model_config=None, training_args=None) -> List[str]:
    """The problems of :func:`resolve_arguments` as a list (empty when the run may start)."""
    try:
        resolve_arguments(args, num_microbatches=num_microbatches,
                          pipeline_model_parallel_size=pipeline_model_parallel_size,
                          model_config=model_config)
    except PACIConfigError as err:
        return err.problems
    return []
