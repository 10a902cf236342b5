"""Pretrain a GPT with megatron-core, Megatron's 1F1B or PACI, on CPU or GPU.

Launch with torchrun, one process per stage (x TP x DP)::

    torchrun --nproc-per-node 4 examples/pretrain_gpt.py --device cpu \\
        --pipeline-model-parallel-size 4 --pipeline-schedule paci

Flags use Megatron-LM's names. Without ``--data-path`` the embedded default corpus (the
running Python's standard library sources) is tokenized once into Megatron's indexed
format under ``--data-cache-dir`` and read back with megatron-core's GPT dataset classes;
with ``--data-path`` a user's existing Megatron data is used as is.

``--log-json PATH`` writes one JSON object per log interval (and per evaluation) with
``iteration``, ``lm_loss``, ``lr``, ``tokens_per_second``, per stage ``drift_max`` (the
largest drift seen so far), ``drift_mean`` and ``drift_histogram`` (micro-batches per
drift value), ``tied_lag_max`` with tied embeddings (the last stage's copy's largest lag
behind its own version, paci_megatron.tied), and ``val_loss`` when evaluated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

if __name__ == "__main__":  # from a clone without installing: the repository's package
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paci_megatron.config import (PACIConfig, PACIConfigError,  # noqa: E402
                                  resolve_arguments, unwritable_file, unwritable_folder)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported once (rank 0), in two lines, with the
    closest flag for each unknown one, and every rank exits with status 2."""

    def error(self, message: str) -> None:
        import difflib

        hints = []
        if message.startswith("unrecognized arguments:"):
            known = list(self._option_string_actions)
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1)
                if word.startswith("--") and close:
                    hints.append(f"{word}: did you mean {close[0]}?")
        _say_once("error: " + message + "".join(f"\n  {h}" for h in hints)
                  + f"\n  ({self.prog} --help lists every flag)")
        _stop()


def _say_once(text: str, speaker: int = 0) -> None:
    """Print to stderr on rank ``speaker`` only (torchrun starts one process per rank)."""
    if int(os.environ.get("RANK", "0")) == speaker:
        print(text, file=sys.stderr, flush=True)


def _stop(speaker: int = 0) -> None:
    """Exit with status 2. The other ranks first give the speaking rank time to print:
    torchrun ends every rank as soon as one exits (then they exit non-zero by its signal)."""
    if int(os.environ.get("RANK", "0")) != speaker:
        time.sleep(10)
    raise SystemExit(2)


SPLIT_FLAGS = {  # flag -> megatron-core TransformerConfig field (Megatron-LM's names)
    "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage",
    "pipeline_model_parallel_layout": "pipeline_model_parallel_layout",
    "account_for_embedding_in_pipeline_split": "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split": "account_for_loss_in_pipeline_split",
}


def split_fields(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``TransformerConfig`` fields of the layer-split flags given (uneven stages)."""
    return {field: getattr(args, flag) for flag, field in SPLIT_FLAGS.items()
            if getattr(args, flag) not in (None, False)}


def split_problems(args: argparse.Namespace) -> List[str]:
    """What is wrong with the layer split, in megatron-core's own words: the split flags
    (or, without them, ``--num-layers`` over the stages) are checked by building the
    ``TransformerConfig`` they give, before anything else starts."""
    pp = args.pipeline_model_parallel_size
    fields = split_fields(args)
    if not fields:
        if args.num_layers % pp:
            return [f"--num-layers {args.num_layers} is not divisible by "
                    f"--pipeline-model-parallel-size {pp}: give an uneven split "
                    "(--decoder-first/last-pipeline-num-layers or "
                    "--pipeline-model-parallel-layout)"]
        return []
    from megatron.core.transformer.transformer_config import TransformerConfig

    given = " ".join(f"--{flag.replace('_', '-')}" + ("" if v is True else f" {v}")
                     for flag, v in vars(args).items() if flag in SPLIT_FLAGS
                     and v not in (None, False))
    try:
        TransformerConfig(num_layers=args.num_layers, hidden_size=8, num_attention_heads=1,
                          pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                          **fields)
    except (ValueError, AssertionError, TypeError, KeyError) as e:
        return [f"{given} with --num-layers {args.num_layers} at "
                f"--pipeline-model-parallel-size {pp}: {e}"]
    return []


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="examples/pretrain_gpt.py", description=__doc__.split("\n")[0])
    g = p.add_argument_group("model (Megatron-LM names)")
    g.add_argument("--num-layers", type=int, default=8)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: --seq-length")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="give the output layer a weight of its own (default: tied to the input "
                   "embedding, as Megatron-LM; under PACI the first and last stage exchange "
                   "the tied weight's gradient and step)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers on the first stage (the middle stages share the rest evenly); "
                   "python -m paci_megatron.sim --balance proposes a split")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers on the last stage (with the output layer and loss)")
    g.add_argument("--pipeline-model-parallel-layout", default=None,
                   help="layers per stage as megatron-core's layout, e.g. 'Et*3|t*3|t*2L' "
                   "(E embedding, t a layer, L the loss, | between stages)")
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                   help="count the embedding as a layer when splitting")
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                   help="count the output layer and loss as a layer when splitting")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=32)
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="default: 10%% of --train-iters (30 of 300)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--optimizer", choices=["adam", "muon"], default="adam",
                   help="adam: AdamW; muon: megatron-core's Muon for the 2-D weights, Adam for "
                   "the rest (needs the emerging-optimizers package)")
    g.add_argument("--muon-momentum", type=float, default=0.9)
    g.add_argument("--muon-use-nesterov", action="store_true")
    g.add_argument("--muon-scale-mode", default="spectral",
                   help="scale of the orthogonalized update: spectral, unit_rms_norm, shape_scaling")
    g.add_argument("--muon-num-ns-steps", type=int, default=5)
    g.add_argument("--muon-extra-scale-factor", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("parallelism")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if available")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--emulate-pipeline", action="store_true",
                   help="run every rank of the pipeline in this one process, on one device "
                   "(paci_megatron.emulator): the same losses as the multi-process run; "
                   "start it with python, not torchrun")
    g = p.add_argument_group("data and logging")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Megatron indexed dataset prefix(es), optionally weighted")
    g.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.json (default: the one prepared next to --data-path)")
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--data-cache-dir", default="data/stdlib",
                   help="where the embedded default corpus is prepared")
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-json", default=None)
    PACIConfig.add_arguments(p)  # --pipeline-schedule and every --paci-* flag
    g = p.add_argument_group("checkpointing (Megatron-LM names)")
    g.add_argument("--save", default=None, help="checkpoint directory to write")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (also saved at the end)")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (saving first, with --save) when the iteration is a multiple")
    args = p.parse_args(argv)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    args.default_warmup = args.lr_warmup_iters is None
    if args.default_warmup:
        args.lr_warmup_iters = max(args.train_iters // 10, 0)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


POSITIVE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                  "micro_batch_size", "global_batch_size", "train_iters", "eval_iters",
                  "eval_interval", "log_interval", "pipeline_model_parallel_size",
                  "tensor_model_parallel_size", "make_vocab_size_divisible_by")


MUON_FLAGS = ("muon_momentum", "muon_use_nesterov", "muon_scale_mode", "muon_num_ns_steps",
              "muon_extra_scale_factor")  # megatron-core OptimizerConfig fields, Megatron-LM names


def check_args(args: argparse.Namespace, world_size: int):
    """Refuse a bad configuration before anything is built, listing every problem and
    what to change (printed once, by rank 0; exit status 2).

    Returns:
        PACI's :class:`~paci_megatron.config.Settings`, resolved here once (None under
        ``--pipeline-schedule 1f1b``).
    """
    problems = []
    for flag in POSITIVE_FLAGS:
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    # the checks below divide by these sizes: a size below 1 is reported above, and
    # counts as 1 here so that every other problem is still found
    tp, pp = max(args.tensor_model_parallel_size, 1), max(args.pipeline_model_parallel_size, 1)
    mbs, heads = max(args.micro_batch_size, 1), max(args.num_attention_heads, 1)
    if world_size % (tp * pp) != 0:
        problems.append(
            f"world size {world_size} is not divisible by TP x PP = {tp * pp}: launch "
            f"torchrun with a multiple of {tp * pp} processes"
        )
    dp = max(world_size // (tp * pp), 1)
    if args.global_batch_size % (mbs * dp) != 0:
        problems.append(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size x DP = {mbs * dp}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda but CUDA is not available: use --device cpu")
    if args.load:
        problems += _load_problems(args, tp, pp)
    if args.save and (not args.load or os.path.abspath(args.load) != os.path.abspath(args.save)):
        from gpt_recipe.checkpoint import latest_iteration

        try:
            saved = latest_iteration(args.save)
        except ValueError:
            saved = "?"
        if saved is not None:
            problems.append(f"--save {args.save} holds checkpoints (up to iteration {saved}) that "
                            "this run did not load: it would overwrite them. Resume with --load "
                            f"{args.save}, or save elsewhere")
    problem = unwritable_file(args.log_json)
    if problem:
        problems.append(f"--log-json {args.log_json}: {problem}")
    problem = unwritable_folder(args.save)  # any schedule (under PACI, a refusal of config too)
    if problem and args.pipeline_schedule != "paci":
        problems.append(f"--save {args.save}: {problem}: nothing could be saved; give a "
                        "folder you can write")
    if args.data_path == []:
        problems.append("--data-path was given without a value (an unset variable?): give "
                        "a data prefix, or leave the flag out for the embedded corpus")
    for flag in ("lr", "min_lr", "weight_decay", "lr_warmup_iters", "clip_grad"):
        if not getattr(args, flag) >= 0:  # also NaN
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    for flag in ("ffn_hidden_size", "exit_interval", "save_interval"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if not args.distributed_timeout_minutes > 0:
        problems.append(f"--distributed-timeout-minutes {args.distributed_timeout_minutes}: "
                        "must be > 0")
    paths = args.data_path or []
    if len(paths) > 1 and _number(paths[0]) is not None:  # Megatron's weighted form
        if len(paths) % 2:
            problems.append(f"--data-path {' '.join(paths)}: weights and prefixes come in pairs "
                            "(WEIGHT PREFIX WEIGHT PREFIX ...)")
        for w in paths[0::2]:
            if not 0 < (_number(w) or 0) < float("inf"):
                problems.append(f"--data-path weight {w}: must be a finite number > 0")
    if args.lr_warmup_iters >= args.train_iters:
        problems.append(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --train-iters "
                        f"{args.train_iters} (the decay needs iterations after the warm-up)")
    if args.hidden_size % heads:
        problems.append(f"--hidden-size {args.hidden_size} is not divisible by "
                        f"--num-attention-heads {args.num_attention_heads}")
    if heads % tp:
        problems.append(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                        f"--tensor-model-parallel-size {tp}")
    problems += split_problems(args)
    if args.emulate_pipeline and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("--emulate-pipeline runs every rank in one process: start it with "
                        "python, not torchrun")
    if args.emulate_pipeline and args.tensor_model_parallel_size > 1:
        problems.append("--emulate-pipeline emulates the pipeline stages only (TP = DP = 1): "
                        f"drop --tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.max_position_embeddings < args.seq_length:
        problems.append("--max-position-embeddings must be >= --seq-length")
    for flag in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be in [0, 1)")
    try:
        shares = [float(x) for x in args.split.split(",")]
        if (len(shares) != 3 or not all(0 <= x < float("inf") for x in shares)
                or shares[0] <= 0 or shares[1] <= 0):
            raise ValueError
    except ValueError:
        problems.append(f"--split {args.split}: give three non-negative train,valid,test "
                        "shares with train and valid above 0 (evaluation needs validation data)")
    settings = None
    try:
        settings = resolve_arguments(args, num_microbatches=args.global_batch_size // (mbs * dp),
                                     pipeline_model_parallel_size=pp,
                                     lr_warmup_iters=args.lr_warmup_iters)
    except PACIConfigError as err:
        problems += err.problems
    if problems:
        _refuse(problems)
    return settings


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _load_problems(args: argparse.Namespace, tp: int, pp: int) -> List[str]:
    """What makes ``--load`` unusable, or a relaunch pointless, before anything starts."""
    from gpt_recipe.checkpoint import checkpoint_shape, latest_iteration, missing_ranks

    try:
        iteration = latest_iteration(args.load)
    except ValueError as err:
        return [str(err)]
    if iteration is None:
        if args.save and os.path.abspath(args.save) == os.path.abspath(args.load):
            return []  # Megatron-LM's resume idiom, --load = --save: nothing saved yet
        return [f"--load {args.load} holds no checkpoint (no latest_checkpointed_iteration.txt): "
                "check the path (with --save the same folder, a first run starts from scratch)"]
    problems = []
    if iteration > args.train_iters:
        problems.append(f"--load {args.load} is at iteration {iteration}, beyond --train-iters "
                        f"{args.train_iters}: raise --train-iters (saving would overwrite "
                        "later checkpoints with earlier ones)")
    shape = checkpoint_shape(args.load, iteration)
    missing = missing_ranks(args.load, iteration, tp, pp)
    if shape == (0, 0):
        problems.append(f"--load {args.load}: its pointer names iteration {iteration}, but "
                        f"iter_{iteration:07d} is missing there: the checkpoint is incomplete")
    elif shape != (tp, pp) and not (shape[0] <= tp and shape[1] <= pp and missing
                                    and not _recorded_shape(args.load, iteration)):
        problems.append(f"--load {args.load} iteration {iteration} was written with TP x PP = "
                        f"{shape[0]} x {shape[1]}, this run has {tp} x {pp}: use the same "
                        "--tensor-model-parallel-size and --pipeline-model-parallel-size")
    elif missing:
        stages = sorted({p for _, p in missing})
        names = ", ".join(f"mp_rank_{t:02d}_{p:03d}" for t, p in missing)
        problems.append(f"--load {args.load} iteration {iteration} is incomplete: the files of "
                        f"stage{'s' if len(stages) > 1 else ''} "
                        f"{', '.join(map(str, stages))} are missing ({names}): resume from an "
                        "earlier iteration's checkpoint")
    return problems


def _recorded_shape(directory: str, iteration: int) -> bool:
    from gpt_recipe.checkpoint import SHAPE

    return os.path.isfile(os.path.join(directory, f"iter_{iteration:07d}", SHAPE))


def _resume_problem(args, info, scheduler, schedule, m) -> Optional[str]:
    """Why a loaded checkpoint cannot continue this run exactly (None if it can)."""
    iteration, extra = info["iteration"], info["extra"]
    saved_gbs = extra.get("global_batch_size", args.global_batch_size)
    if saved_gbs != args.global_batch_size:
        return (f"it was trained with --global-batch-size {saved_gbs}; this run has "
                f"{args.global_batch_size}, which would re-read or skip samples: use {saved_gbs}")
    if scheduler.num_steps != iteration * saved_gbs:
        return (f"its iteration ({iteration}) and its LR scheduler ({scheduler.num_steps} "
                "samples) disagree: the checkpoint is damaged")
    if scheduler.lr_decay_steps != max(args.train_iters * args.global_batch_size, 1):
        trained_for = scheduler.lr_decay_steps // args.global_batch_size
        return (f"its learning-rate schedule decays over {trained_for} iterations; this run "
                f"asks --train-iters {args.train_iters}: resume with --train-iters {trained_for} "
                "(a longer run needs a schedule of its own, from a new --save folder)")
    return None


def _truncate_log(path: str, iteration: int) -> None:
    """Keep the JSON records of ``path`` up to ``iteration``: a resumed run writes the later
    ones again, and each must appear once."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line)["iteration"] <= iteration]
    if len(keep) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(keep)


def _resumed_paci_state(args, schedule, iteration: int, m: int, dp_size: int):
    """The schedule to continue with: the checkpoint's PACI state, or, where that does not
    count this run's micro-batches (a 1F1B checkpoint, another --micro-batch-size), a
    drained state rebuilt from the samples consumed (its drift statistics start afresh)."""
    if not hasattr(schedule, "drain"):
        return schedule
    microbatches = iteration * m
    if schedule.state.forwarded == microbatches:
        return schedule
    fresh = type(schedule)(schedule.optimizer, schedule.settings)
    a = schedule.settings.accumulation
    if microbatches % a:
        _agree_or_stop(f"{iteration} iterations of {m} micro-batches are not whole windows of "
                       f"--paci-accumulation {a}", f"--load {args.load} cannot be resumed")
    fresh.load_state_dict(fresh.drained_state(microbatches, a, iteration))
    return fresh


def _resume_notices(args, schedule, iteration: int, m: int) -> None:
    """Say (once) which PACI settings differ from those the checkpoint trained with: each
    applies from the resumed iteration on (the windows are counted afresh from the
    checkpoint's drained state, so a new accumulation factor is exact from there)."""
    saved = getattr(schedule, "restored_from", None) or {}
    settings = getattr(schedule, "settings", None)
    if settings is None:
        return
    now = {"accumulation": settings.accumulation, "lookahead": settings.lookahead,
           "sync_warmup_iters": settings.sync_warmup_iters}
    for key, flag in (("accumulation", "--paci-accumulation"), ("lookahead", "--paci-lookahead"),
                      ("sync_warmup_iters", "--paci-sync-warmup-iters")):
        if saved.get(key) is not None and saved[key] != now[key]:
            _say_once(f"> resuming at iteration {iteration} with {flag} {now[key]}; the "
                      f"checkpoint was trained with {saved[key]}: the new value applies from "
                      f"iteration {iteration + 1} on")


def _already_done(args: argparse.Namespace) -> bool:
    """True (and says so, once) if ``--load`` already holds ``--train-iters``."""
    from gpt_recipe.checkpoint import latest_iteration

    if not args.load or latest_iteration(args.load) != args.train_iters:
        return False
    _say_once(f"> nothing to do: {args.load} holds iteration {args.train_iters} = --train-iters")
    return True


def _refuse(problems: List[str], what: str = "bad configuration, nothing was started") -> None:
    _say_once(f"error: {what}:\n" + "\n".join(f"  - {x}" for x in problems))
    _stop()


def setup_distributed(args: argparse.Namespace, emulated: Optional[Tuple[Any, int]] = None) -> None:
    """torch.distributed, megatron-core's model-parallel groups and the seeds, as Megatron-LM
    sets them up; ``emulated``: ``(store, rank)`` of a rank of :func:`emulate`."""
    import datetime

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
    if args.device == "cpu":
        from paci_megatron.cpu import enable_cpu_mode

        enable_cpu_mode(force=True)
    if emulated is not None:
        from paci_megatron.emulator import BACKEND

        store, rank = emulated
        if args.device == "cuda":
            torch.cuda.set_device(0)  # every rank on the one device
        torch.distributed.init_process_group(backend=BACKEND, store=store, rank=rank,
                                             world_size=int(os.environ["WORLD_SIZE"]),
                                             timeout=timeout)
    elif args.device == "cpu":
        torch.distributed.init_process_group(backend="gloo", timeout=timeout)
    else:
        from paci_megatron import compat

        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
        # device_id: NCCL communicators are created at start-up on every rank, not lazily
        # at a first send that its peer answers only later in its plan
        torch.distributed.init_process_group(backend="nccl", timeout=timeout,
                                             **compat.init_device_kwargs(local))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)


def build_data(args: argparse.Namespace, dp_rank: int, dp_size: int):
    """Train/valid datasets and the vocabulary size (padded like Megatron-LM)."""
    from gpt_recipe import data

    data_path = args.data_path
    if not data_path:
        prefix = os.path.join(args.data_cache_dir, "stdlib")
        problem = None
        if torch.distributed.get_rank() == 0:
            try:
                record = data.prepare_corpus(prefix, progress=_progress)
                print(f"> data: {record.num_documents} documents, {record.num_tokens} tokens "
                      f"({'cached' if record.skipped else 'prepared'}) at {record.prefix}",
                      flush=True)
            except (OSError, ValueError) as err:
                problem = str(err)
        _agree_or_stop(problem, "the default corpus could not be prepared")
        data_path = [prefix]
    problem = None
    try:
        tokenizer = data.CorpusTokenizer(args.tokenizer_model) if args.tokenizer_model else None
        gbs = args.global_batch_size
        train_ds, valid_ds = data.build_gpt_datasets(
            data_path if len(data_path) > 1 else data_path[0],
            tokenizer,
            seq_length=args.seq_length,
            train_samples=args.train_iters * gbs,
            valid_samples=args.eval_iters * gbs,  # the same validation set at every evaluation
            seed=args.seed,
            split=args.split,
            create_attention_mask=False,  # GPTModel builds the causal mask itself
        )
    except (OSError, ValueError) as err:
        problem = str(err)
    _agree_or_stop(problem, "the data cannot be used, nothing was trained")
    if args.data_path and torch.distributed.get_rank() == 0:
        prefixes = data._parse_data_path(data_path)[0]
        docs, tokens = (sum(x) for x in zip(*(data.corpus_size(p) for p in prefixes)))
        share = float(args.split.split(",")[0]) / sum(float(x) for x in args.split.split(","))
        passes = args.train_iters * args.global_batch_size * args.seq_length / max(tokens * share, 1)
        print(f"> data: {' '.join(data_path)}: {docs} documents, {tokens:,} tokens"
              + (f"; the run reads its training split about {passes:.0f} times" if passes >= 2
                 else ""), flush=True)
    if tokenizer is None:
        prefix = data_path[0] if len(data_path) == 1 else data_path[1]
        tokenizer = data.CorpusTokenizer.for_data_prefix(prefix)
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    vocab = int(math.ceil(tokenizer.vocab_size / multiple) * multiple)
    return train_ds, valid_ds, vocab


def _progress(done: int, total: int) -> None:
    """The corpus preparation's progress line (rank 0)."""
    print(f"\r> preparing the default corpus: {done}/{total} files tokenized", end="",
          flush=True)
    if done == total:
        print(flush=True)


def _agree_or_stop(problem: Optional[str], what: str) -> None:
    """A collective: every rank learns whether any rank hit ``problem``; if one did, it is
    printed once (the lowest such rank's) and every rank exits with status 2."""
    flags = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, problem)
    failed = [f for f in flags if f]
    if failed:
        _say_once(f"error: {what}:\n  - {failed[0]}", speaker=flags.index(failed[0]))
        _stop(speaker=flags.index(failed[0]))


def build_training(args: argparse.Namespace, vocab_size: int, settings=None):
    """Model chunks, optimizer (PACI-wrapped or not), LR scheduler, forward_backward_func;
    ``settings``: PACI's, resolved by :func:`check_args` (None: Megatron's 1F1B)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import paci_megatron as pm
    from gpt_recipe import model as gpt

    on_gpu = args.device == "cuda"
    config = gpt.transformer_config(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size, bf16=args.bf16,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        on_gpu=on_gpu, **split_fields(args),
    )
    use_te = on_gpu and importlib.util.find_spec("transformer_engine") is not None
    if on_gpu and not use_te:
        print("> Transformer Engine not installed: local layer spec", flush=True)
    model = gpt.build_model(
        config, vocab_size=vocab_size, max_position_embeddings=args.max_position_embeddings,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        use_transformer_engine=use_te, device=gpt.stage_device(args.device),
    )
    optimizer = gpt.build_optimizer(
        model, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        bf16=args.bf16, optimizer=args.optimizer,
        muon={name: getattr(args, name) for name in MUON_FLAGS} if args.optimizer == "muon" else None,
    )
    gbs = args.global_batch_size
    scheduler = gpt.build_scheduler(
        optimizer, lr=args.lr, min_lr=args.min_lr, train_samples=args.train_iters * gbs,
        warmup_samples=args.lr_warmup_iters * gbs, decay_style=args.lr_decay_style,
        weight_decay=args.weight_decay,
    )
    config.grad_scale_func = optimizer.scale_loss
    if settings is not None:
        schedule = pm.build(optimizer, model, settings, opt_param_scheduler=scheduler)
        optimizer = schedule.optimizer
    else:
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model[0].no_sync
        schedule = get_forward_backward_func()
    return model, optimizer, scheduler, schedule


def average_losses(losses: List[Dict[str, torch.Tensor]]) -> float:
    """Mean of the per-micro-batch ``lm loss`` values (last stage only)."""
    return float(sum(float(d["lm loss"]) for d in losses) / max(len(losses), 1))


def evaluate(args, model, schedule, valid_ds, num_microbatches, dp_rank, dp_size) -> Optional[float]:
    """Validation loss over ``--eval-iters`` iterations of the same validation samples at
    every evaluation (so values compare across evaluations, runs and resumes); drains
    PACI first."""
    from gpt_recipe import model as gpt

    if hasattr(schedule, "drain"):
        schedule.drain()
    for chunk in model:
        chunk.eval()
    it = gpt.microbatches(valid_ds, args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                          device=gpt.stage_device(args.device))
    losses = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            out = schedule(forward_step_func=gpt.forward_step, data_iterator=it, model=model,
                           num_microbatches=num_microbatches, seq_length=args.seq_length,
                           micro_batch_size=args.micro_batch_size, forward_only=True)
            losses.extend(out)
    for chunk in model:
        chunk.train()
    return average_losses(losses) if losses else None


def gather_to_last(value: Optional[float], group) -> Optional[float]:
    """A float held by the last pipeline stage, averaged over the data-parallel replicas
    (as Megatron-LM averages its logged losses), broadcast to the whole pipeline group."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([value if value is not None else 0.0], dtype=torch.float64,
                     device="cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu")
    dp = ps.get_data_parallel_world_size()
    if ps.is_pipeline_last_stage() and dp > 1:
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        t /= dp
    torch.distributed.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    return float(t.item())


def train(args: argparse.Namespace, settings=None) -> List[dict]:
    """The training loop, shaped like Megatron-LM's ``train`` / ``train_step``; ``settings``:
    PACI's (:func:`check_args`), None for Megatron's 1F1B."""
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt
    from gpt_recipe.checkpoint import latest_iteration
    from paci_megatron.telemetry import gather_drift

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    m = args.global_batch_size // (args.micro_batch_size * dp_size)
    train_ds, valid_ds, vocab = build_data(args, dp_rank, dp_size)
    model, optimizer, scheduler, schedule = build_training(args, vocab, settings)
    start_iteration = 0
    if args.load and latest_iteration(args.load) is not None:
        from gpt_recipe.checkpoint import DamagedCheckpoint, load_checkpoint

        info, problem = {"iteration": 0, "extra": {}}, None
        try:
            info = load_checkpoint(args.load, model, optimizer, scheduler,
                                   schedule if hasattr(schedule, "drain") else None)
        except DamagedCheckpoint as err:
            problem = str(err)
        except Exception as err:  # torch's state-dict errors, many kinds
            problem = (f"it does not fit this model and optimizer (another --optimizer, model "
                       f"shape or flag?): {str(err).splitlines()[0][:300]}")
        _agree_or_stop(problem, f"--load {args.load} cannot be loaded")
        start_iteration = info["iteration"]
        _agree_or_stop(_resume_problem(args, info, scheduler, schedule, m),
                       f"--load {args.load} cannot be resumed by this run")
        schedule = _resumed_paci_state(args, schedule, start_iteration, m, dp_size)
        _resume_notices(args, schedule, start_iteration, m)
    # micro-batch i of DP rank r reads samples (i * DP + r) * mbs ...: a resumed run
    # continues exactly where the saved one stopped
    train_it = gpt.microbatches(train_ds, args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                start_sample=start_iteration * args.global_batch_size,
                                device=gpt.stage_device(args.device))
    pp_group = ps.get_pipeline_model_parallel_group()
    is_writer = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    log = None
    if args.log_json and is_writer:
        os.makedirs(os.path.dirname(os.path.abspath(args.log_json)), exist_ok=True)
        log = open(args.log_json, "a" if start_iteration else "w")  # a resume appends
        if start_iteration:  # records a killed run wrote after its last checkpoint go
            _truncate_log(args.log_json, start_iteration)
    records: List[dict] = []

    recent_losses: List[float] = []  # training losses since the last save (last stage)

    def save(iteration: int) -> None:
        from gpt_recipe.checkpoint import save_checkpoint

        loss = gather_to_last(sum(recent_losses) / len(recent_losses) if recent_losses else 0.0,
                              pp_group)
        recent_losses.clear()
        if not math.isfinite(loss):
            _say_once(f"error: not saving iteration {iteration}: the training loss is {loss} "
                      "(the run diverged; the last checkpoint is kept). Lower --lr.",
                      speaker=torch.distributed.get_world_size() - 1)
            raise SystemExit(3)
        paci = schedule if hasattr(schedule, "drain") else None
        if paci is not None:
            paci.drain()  # one consistent set of weights on every stage
        path = save_checkpoint(args.save, iteration, model, optimizer, scheduler, paci,
                               extra={"global_batch_size": args.global_batch_size,
                                      "consumed_samples": iteration * args.global_batch_size})
        if is_writer:
            print(f"> saved iteration {iteration} to {os.path.dirname(os.path.dirname(path))}",
                  flush=True)

    def drift() -> Dict[str, list]:
        stages = gather_drift(getattr(schedule, "telemetry", None), pp_group)
        return {
            "drift_max": [d["max"] for d in stages],
            "drift_mean": [round(d["mean"], 4) for d in stages],
            "drift_histogram": [d["histogram"] for d in stages],
            **({"tied_lag_max": stages[-1]["tied_lag"]["max"]} if "tied_lag" in stages[-1] else {}),
        }

    def skipped() -> List[int]:
        """Updates skipped for NaN/Inf gradients so far, per stage (a collective)."""
        mine = [len(getattr(optimizer, "skipped_updates", []))]
        out: List[Optional[List[int]]] = [None] * torch.distributed.get_world_size(pp_group)
        torch.distributed.all_gather_object(out, mine, group=pp_group)
        return [x[0] for x in out]

    def run_eval() -> float:
        val = evaluate(args, model, schedule, valid_ds, m, dp_rank, dp_size)
        return gather_to_last(val, pp_group)

    def emit(record: dict) -> None:
        records.append(record)
        if is_writer:
            print(progress_line(record, args), flush=True)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()

    if is_writer and args.default_warmup:
        print(f"> lr warm-up: {args.lr_warmup_iters} iterations (10% of --train-iters; "
              "--lr-warmup-iters sets it)", flush=True)
    from megatron.core.utils import get_attr_wrapped_model

    layers: List[Optional[int]] = [None] * torch.distributed.get_world_size(pp_group)
    torch.distributed.all_gather_object(
        layers, len(get_attr_wrapped_model(model[0], "decoder").layers), group=pp_group)
    if is_writer:
        print(f"> {args.pipeline_schedule}: P={args.pipeline_model_parallel_size} "
              f"DP={dp_size} m={m} device={args.device} bf16={args.bf16} "
              f"optimizer={args.optimizer} layers per stage {layers}", flush=True)
    sync = settings.sync_warmup_iters if settings is not None else 0
    if sync and is_writer:
        exact = " (exactly 1F1B)" if settings.accumulation == m else ""
        print(f"> paci: synchronous warm-up, iterations 1..{sync} drained after each{exact}; "
              f"PACI takes over at iteration {sync + 1}", flush=True)
    if start_iteration == 0:
        emit({"iteration": 0, "val_loss": run_eval(), "layers_per_stage": layers, **drift()})
    window_losses: List[float] = []
    t0 = time.time()
    tokens = 0
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    for iteration in range(start_iteration + 1, args.train_iters + 1):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = schedule(forward_step_func=gpt.forward_step, data_iterator=train_it, model=model,
                          num_microbatches=m, seq_length=args.seq_length,
                          micro_batch_size=args.micro_batch_size, forward_only=False)
        optimizer.step()
        scheduler.step(increment=args.global_batch_size)
        if sync and iteration == sync + 1 and is_writer:
            print(f"> paci: PACI took over at iteration {iteration}", flush=True)
        if losses:
            window_losses.append(average_losses(losses))
            recent_losses.append(window_losses[-1])
        tokens += args.global_batch_size * args.seq_length
        evaluated = iteration % args.eval_interval == 0 or iteration == args.train_iters
        if iteration % args.log_interval == 0 or evaluated:
            loss = gather_to_last(
                sum(window_losses) / len(window_losses) if window_losses else None, pp_group)
            elapsed = time.time() - t0
            record = {
                "iteration": iteration,
                "lm_loss": loss,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "tokens_per_second": tokens / elapsed if elapsed > 0 else None,
                **drift(),
            }
            if settings is not None and settings.skip_nonfinite_updates:
                record["skipped_updates"] = skipped()
            if evaluated:
                record["val_loss"] = run_eval()
            emit(record)
            window_losses, tokens, t0 = [], 0, time.time()
        saved = args.save and args.save_interval and iteration % args.save_interval == 0
        if saved:
            save(iteration)
        if args.exit_interval and iteration % args.exit_interval == 0:
            if args.save and not saved:
                save(iteration)
            break
        if iteration == crash_after:
            _crash(iteration)
    else:
        if (args.save and start_iteration < args.train_iters
                and (not args.save_interval or args.train_iters % args.save_interval)):
            save(args.train_iters)
    if settings is not None:
        written = schedule.finish()  # drains; writes --paci-trace (a collective)
        if written is not None:
            print(f"> trace of {written} actions written to {settings.config.trace}", flush=True)
    if log:
        log.close()
    return records


CRASH_ENV = "PACI_EXAMPLE_CRASH_AFTER"
"""Fault injection for the resume tests: with ``PACI_EXAMPLE_CRASH_AFTER=N`` in the
environment every rank is killed (SIGKILL, no clean-up) once iteration ``N`` is complete
(its log record, evaluation and checkpoint written), as a machine failure would."""


def _crash(iteration: int) -> None:
    import signal

    torch.distributed.barrier()  # every rank has finished iteration N before any dies
    _say_once(f"> {CRASH_ENV}: killing every rank after iteration {iteration}")
    os.kill(os.getpid(), signal.SIGKILL)


def progress_line(record: dict, args: argparse.Namespace) -> str:
    """One log record in Megatron-LM's style (the JSON form goes to ``--log-json``)."""
    it = record["iteration"]
    parts = [f" iteration {it:>6}/{args.train_iters:>6}",
             f"consumed samples: {it * args.global_batch_size:>9}"]
    if record.get("lm_loss") is not None:
        parts += [f"lm loss: {record['lm_loss']:.6E}", f"learning rate: {record['lr']:.6E}"]
    if record.get("tokens_per_second"):
        parts.append(f"tokens/s: {record['tokens_per_second']:.0f}")
    if args.pipeline_schedule == "paci":
        parts.append(f"drift max per stage: {record['drift_max']}")
        if record.get("tied_lag_max") is not None:
            parts.append(f"tied embedding lag max: {record['tied_lag_max']}")
    if record.get("skipped_updates") is not None:
        parts.append(f"skipped updates per stage: {record['skipped_updates']}")
    if record.get("val_loss") is not None:
        parts.append(f"validation lm loss: {record['val_loss']:.6E}")
    return " | ".join(parts) + " |"


def emulate(args: argparse.Namespace, settings) -> None:
    """``--emulate-pipeline``: every rank of the run (TP x PP, DP 1) in this process, taking
    turns on one device (:mod:`paci_megatron.emulator`); each runs :func:`train` as its own
    process would, so the losses are the multi-process run's."""
    import copy

    from paci_megatron.emulator import EmulationError, run_ranks

    world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    store = torch.distributed.HashStore()

    def rank_main(rank: int) -> List[dict]:
        mine = copy.deepcopy(args)
        setup_distributed(mine, emulated=(store, rank))
        try:
            records = train(mine, settings)
            if rank == world - 1:
                _summary(mine, records)
            return records
        finally:
            torch.distributed.destroy_process_group()

    try:
        run_ranks(world, rank_main)
    except EmulationError as err:
        code = getattr(err, "exit_code", None)
        if code is not None:  # a rank stopped the run on purpose, having said why
            raise SystemExit(code) from None
        raise


def _summary(args: argparse.Namespace, records: List[dict]) -> None:
    """The last rank's closing line: validation losses, last loss, drift, log file."""
    if not records:
        return
    vals = [(r["iteration"], r["val_loss"]) for r in records if "val_loss" in r]
    losses = [r["lm_loss"] for r in records if r.get("lm_loss") is not None]
    summary = [f"> done: iteration {records[-1]['iteration']}"]
    if vals:  # a resumed run that stops before its next evaluation has none
        summary.append(f"validation loss {vals[0][1]:.3f} (iteration {vals[0][0]}) -> "
                       f"{vals[-1][1]:.3f} (iteration {vals[-1][0]})")
    if losses:
        summary.append(f"last lm loss {losses[-1]:.3f}")
    if args.pipeline_schedule == "paci":
        summary.append(f"drift max per stage {records[-1]['drift_max']}")
    summary.append(f"log: {args.log_json}" if args.log_json else "no --log-json")
    print(" | ".join(summary), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    # megatron-core announces at import that Apex / Transformer Engine are absent.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope).*")
    args = parse_args(argv)
    if args.emulate_pipeline:
        settings = check_args(args, args.tensor_model_parallel_size
                              * args.pipeline_model_parallel_size)
        if not _already_done(args):
            emulate(args, settings)
        return
    if "RANK" not in os.environ:  # plain `python examples/pretrain_gpt.py`: one process
        import socket

        with socket.socket() as sock:  # a free port on this machine
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    settings = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    if _already_done(args):
        return
    setup_distributed(args)
    try:
        records = train(args, settings)
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            _summary(args, records)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
