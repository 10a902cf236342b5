"""Checkpoints of a drained PACI run (and of Megatron's 1F1B) in Megatron's legacy layout.

``<dir>/iter_<7 digits>/mp_rank_<tp:02d>_<pp:03d>/model_optim_rng.pt`` per model-parallel
rank (written by DP rank 0; the optimizer must not be Megatron's distributed optimizer,
whose state is sharded over DP), and ``<dir>/latest_checkpointed_iteration.txt``. Each
file holds the model chunks' and optimizer's ``state_dict()``, the LR scheduler's, the
RNG states (CPU, CUDA when present, megatron-core's model-parallel tracker) and, for
PACI, the stage's planner state, version and drift telemetry.

PACI saves only on a drained pipeline (every stage at the same version, nothing in
flight): :func:`save_checkpoint` refuses otherwise. Files are written under a temporary
name and renamed, so a crash while saving leaves the previous checkpoint loadable; a
checkpoint with non-finite weights is refused.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_path", "latest_iteration",
           "checkpoint_shape", "missing_ranks", "DamagedCheckpoint"]

TRACKER = "latest_checkpointed_iteration.txt"
SHAPE = "parallel_sizes.txt"  # "<TP> <PP>" of the run that wrote the iteration


class DamagedCheckpoint(RuntimeError):
    """A checkpoint file exists but cannot be read; the message names the file."""


def checkpoint_path(directory: str, iteration: int) -> str:
    """File this rank writes / reads for ``iteration`` (Megatron's legacy naming)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_rank()
    return os.path.join(directory, f"iter_{iteration:07d}", f"mp_rank_{tp:02d}_{pp:03d}",
                        "model_optim_rng.pt")


def latest_iteration(directory: str) -> Optional[int]:
    """Iteration named by the tracker file, or None if there is no checkpoint.

    Raises:
        ValueError: the tracker holds no iteration number (Megatron-LM's ``release``
            checkpoints, or a damaged file), naming the file.
    """
    path = os.path.join(directory, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{path} holds {text!r}, not an iteration: this recipe resumes only "
                         "from checkpoints it saved itself (point --load at one)")
    return int(text)


def checkpoint_shape(directory: str, iteration: int) -> Tuple[int, int]:
    """``(TP, PP)`` of the run that wrote ``iteration``: from the sizes it recorded
    (``parallel_sizes.txt``), else (older checkpoints) from the ``mp_rank_<tp>_<pp>``
    folders present; ``(0, 0)`` when there are none."""
    folder = os.path.join(directory, f"iter_{iteration:07d}")
    try:
        with open(os.path.join(folder, SHAPE), encoding="utf-8") as f:
            tp, pp = (int(x) for x in f.read().split())
        return tp, pp
    except (OSError, ValueError):
        pass
    ranks = [name.split("_")[2:] for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             if name.startswith("mp_rank_")]
    if not ranks:
        return 0, 0
    return max(int(t) for t, _ in ranks) + 1, max(int(p) for _, p in ranks) + 1


def missing_ranks(directory: str, iteration: int, tp: int, pp: int) -> List[Tuple[int, int]]:
    """``(tp rank, pipeline stage)`` of every model-parallel rank of a TP x PP run whose
    file for ``iteration`` is missing."""
    folder = os.path.join(directory, f"iter_{iteration:07d}")
    return [(t, p) for p in range(pp) for t in range(tp)
            if not os.path.isfile(os.path.join(folder, f"mp_rank_{t:02d}_{p:03d}",
                                               "model_optim_rng.pt"))]


def _remove_stale_temporaries(directory: str) -> None:
    """Files a killed save left behind (``*.tmp<pid>``), under ``directory``."""
    for root, _, files in os.walk(directory):
        for name in files:
            if ".tmp" in name and name.rsplit(".tmp", 1)[1].isdigit():
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))


def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_save(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    directory: str,
    iteration: int,
    model: Sequence[torch.nn.Module],
    optimizer,
    opt_param_scheduler=None,
    schedule=None,
    extra: Optional[Dict[str, Any]] = None,
) -> str:
    """Save this rank's state for ``iteration``; call on every rank (it has a barrier).

    Args:
        directory: checkpoint root (``--save``).
        iteration: training iterations completed.
        model: the model chunks. optimizer: Megatron's optimizer or a ``PACIOptimizer``.
        opt_param_scheduler: Megatron's ``OptimizerParamScheduler`` or None.
        schedule: the ``PACISchedule`` (None for Megatron's own schedule).
        extra: small picklable values to store (e.g. consumed samples).

    Returns:
        The path written by this rank's model-parallel group.

    Raises:
        RuntimeError: micro-batches are in flight (call ``schedule.drain()`` on every rank
            first), or a parameter is NaN/Inf (the previous checkpoint is kept).
        NotImplementedError: the optimizer is Megatron's distributed optimizer.
    """
    from megatron.core import parallel_state as ps

    from paci_megatron import internals

    if any(type(o).__name__ == "DistributedOptimizer" for o in internals.inner_optimizers(optimizer)):
        raise NotImplementedError(
            "Megatron's distributed optimizer shards its state over DP, which this checkpoint "
            "format does not save: checkpoint without --use-distributed-optimizer"
        )
    problem = None
    stage = ps.get_pipeline_model_parallel_rank()
    if schedule is not None and (schedule.in_flight or schedule.has_unsent_gradient):
        problem = (f"stage {stage}: {schedule.in_flight} micro-batches in flight: call drain() "
                   "on every rank before saving a checkpoint")
    for chunk in model:
        for name, p in chunk.named_parameters():
            if problem is None and not torch.isfinite(p.detach()).all():
                problem = (f"stage {stage}: parameter {name} has NaN/Inf at iteration "
                           f"{iteration}; not saving (the last checkpoint is kept)")
    # every rank agrees before anyone writes, so a refusal on one rank cannot leave the
    # others waiting in the barrier below
    if torch.distributed.is_initialized():
        flag = torch.tensor([0.0 if problem else 1.0],
                            device="cuda" if torch.cuda.is_available() else None)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() == 0.0 and problem is None:
            problem = f"another rank refused to save iteration {iteration} (see its error)"
    if problem:
        raise RuntimeError(problem)
    path = checkpoint_path(directory, iteration)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        _remove_stale_temporaries(directory)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if ps.get_data_parallel_rank() == 0:
        state = {
            "iteration": iteration,
            "model": [chunk.state_dict() for chunk in model],
            "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": (
                opt_param_scheduler.state_dict() if opt_param_scheduler is not None else None
            ),
            "paci": schedule.state_dict() if schedule is not None else None,
            "rng": _rng_state(),
            "extra": dict(extra or {}),
        }
        _atomic_save(state, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        sizes = os.path.join(os.path.dirname(os.path.dirname(path)), SHAPE)
        with open(f"{sizes}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
            f.write(f"{ps.get_tensor_model_parallel_world_size()} "
                    f"{ps.get_pipeline_model_parallel_world_size()}\n")
        os.replace(f"{sizes}.tmp{os.getpid()}", sizes)
        tracker = os.path.join(directory, TRACKER)
        tmp = f"{tracker}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
        os.replace(tmp, tracker)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def load_checkpoint(
    directory: str,
    model: Sequence[torch.nn.Module],
    optimizer,
    opt_param_scheduler=None,
    schedule=None,
    iteration: Optional[int] = None,
) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns ``{"iteration", "extra"}``.

    Raises:
        FileNotFoundError: no checkpoint in ``directory`` (or not for this rank), naming
            the path looked for.
        DamagedCheckpoint: this rank's file cannot be read, naming it.
    """
    if iteration is None:
        iteration = latest_iteration(directory)
        if iteration is None:
            raise FileNotFoundError(f"no {TRACKER} in {directory}: nothing to load (check --load)")
    path = checkpoint_path(directory, iteration)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing (was it saved with the "
                                "same TP x PP sizes?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError("it holds no model state")
    except Exception as err:  # torch's unpickling errors come in many kinds
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DamagedCheckpoint(f"{path} cannot be read ({first}): the file is damaged; "
                                "resume from an earlier iteration's checkpoint") from None
    for chunk, sd in zip(model, state["model"]):
        chunk.load_state_dict(sd)
    optimizer.load_state_dict(state["optimizer"])
    if opt_param_scheduler is not None and state["opt_param_scheduler"] is not None:
        opt_param_scheduler.load_state_dict(state["opt_param_scheduler"])
    if schedule is not None and state["paci"] is not None:
        paci = dict(state["paci"])
        paci.setdefault("iteration", state["iteration"])  # saved before PACI recorded it
        schedule.load_state_dict(paci)
    _set_rng_state(state["rng"])
    return {"iteration": state["iteration"], "extra": state["extra"]}
