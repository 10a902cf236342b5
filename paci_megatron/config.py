"""PACI settings and the validation of a Megatron setup against PACI's rules.

All checks live here and raise one error type, :class:`PACIConfigError`, listing every
violation at once with what to change (docs/design.md, "What stays stage-local, what is
refused").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .plan import drift_bound

__all__ = ["PACIConfig", "PACIConfigError", "validate_setup", "divisors"]


class PACIConfigError(ValueError):
    """A Megatron configuration PACI cannot run. ``problems`` lists each violation."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"PACI cannot run this configuration ({len(problems)} problem(s)):\n{lines}")


@dataclass
class PACIConfig:
    """Settings of the PACI schedule.

    Attributes:
        accumulation: ``a``, backward micro-batches each stage accumulates before its own
            optimizer update; ``None`` = the micro-batches of one iteration (``a = m``,
            one update per stage per iteration: the global batch keeps its meaning).
        max_drift: refuse a configuration whose drift bound ``ceil((P-1-s)/a)`` exceeds
            this on any stage (``--paci-max-drift``); ``None`` = no limit.
        check_drift: raise if a measured drift ever exceeds the bound (always on in tests).
        p2p_timeout_s: the longest one send/receive between stages may wait, in seconds;
            then the stage raises an error naming the peer and the micro-batch (default
            600 s, Megatron-LM's default ``--distributed-timeout-minutes``).
        memory_mode: ``"activations"`` keeps each in-flight micro-batch's activations, as
            1F1B does; ``"recompute"`` keeps only the stage input (plus the data the
            forward read) and recomputes the forward at backward time with the weights
            current then (the reference implementation's memory mode): activation memory
            of one micro-batch per stage, at the cost of a second forward.
    """

    accumulation: Optional[int] = None
    max_drift: Optional[int] = None
    check_drift: bool = True
    p2p_timeout_s: float = 600.0
    memory_mode: str = "activations"

    def resolve_accumulation(self, num_microbatches: int) -> int:
        """``a`` for an iteration of ``num_microbatches`` micro-batches."""
        return self.accumulation if self.accumulation is not None else num_microbatches


def divisors(n: int) -> List[int]:
    """Positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_setup(
    paci: PACIConfig,
    *,
    num_microbatches: int,
    pipeline_model_parallel_size: int,
    model_config=None,
    share_embeddings_and_output_weights: bool = False,
) -> int:
    """Check a Megatron setup against PACI's rules before training starts.

    Args:
        paci: the :class:`PACIConfig`.
        num_microbatches: ``m`` = global batch / (micro batch x DP).
        pipeline_model_parallel_size: ``P``.
        model_config: megatron-core ``TransformerConfig`` (or None to skip its checks).
        share_embeddings_and_output_weights: True if the input embedding and output
            layer share weights (Megatron's default unless
            ``--untie-embeddings-and-output-weights``).

    Returns:
        The accumulation factor ``a`` to use.

    Raises:
        PACIConfigError: listing every violation and the flag to change.
    """
    problems: List[str] = []
    m, P = num_microbatches, pipeline_model_parallel_size
    a = paci.resolve_accumulation(m) if m >= 1 else 1
    if m < 1:
        problems.append(f"num_microbatches is {m}: need at least 1 (check --global-batch-size)")
    if a < 1:
        problems.append(f"--paci-accumulation is {a}: must be >= 1")
    elif m >= 1 and m % a != 0:
        problems.append(
            f"--paci-accumulation {a} does not divide the {m} micro-batches of an iteration "
            f"(fewer micro-batches than one accumulation window needs, or windows that end "
            f"mid-iteration): choose one of {divisors(m)}, or change --global-batch-size"
        )
    if P < 1:
        problems.append(f"pipeline size is {P}: must be >= 1")
    if paci.max_drift is not None and paci.max_drift < 0:
        problems.append(f"--paci-max-drift {paci.max_drift}: must be >= 0")
    elif paci.max_drift is not None and a >= 1 and P >= 1 and m >= 1:
        worst = drift_bound(P, 0, a)
        if worst > paci.max_drift:
            fits = [d for d in divisors(m) if drift_bound(P, 0, d) <= paci.max_drift]
            if fits:
                fix = f"use --paci-accumulation {fits[0]} (or any of {fits})"
            else:
                fix = (f"no accumulation factor dividing m = {m} achieves it; the smallest "
                       f"bound is {drift_bound(P, 0, m)}: raise --paci-max-drift or use "
                       "--pipeline-schedule 1f1b")
            problems.append(
                f"drift bound ceil((P-1)/a) = {worst} on stage 0 exceeds --paci-max-drift "
                f"{paci.max_drift}: {fix}"
            )
    if not paci.p2p_timeout_s > 0:
        problems.append(f"the pipeline send/receive timeout is {paci.p2p_timeout_s} s: must be "
                        "> 0 (--distributed-timeout-minutes)")
    if paci.memory_mode not in ("activations", "recompute"):
        problems.append(
            f"memory mode {paci.memory_mode!r} is unknown: use 'activations' or 'recompute' "
            "(--paci-memory-mode)"
        )
    if share_embeddings_and_output_weights and P > 1:
        problems.append(
            "tied input embedding and output weights across pipeline stages need a gradient "
            "all-reduce between the first and last stage at every update: add "
            "--untie-embeddings-and-output-weights"
        )
    c = model_config
    if c is not None:
        if P > 1 and getattr(c, "pipeline_dtype", None) is None:
            problems.append(
                "the model config has no pipeline_dtype, the dtype of activations sent "
                "between stages: set TransformerConfig(pipeline_dtype=torch.float32 or "
                "torch.bfloat16) (Megatron-LM sets it from --bf16)"
            )
        if getattr(c, "calculate_per_token_loss", False):
            problems.append(
                "--calculate-per-token-loss reduces token counts across pipeline stages: "
                "remove it (PACI averages the loss per micro-batch)"
            )
        if getattr(c, "fp16", False):
            problems.append(
                "--fp16 uses dynamic loss scaling that needs every stage to agree on overflow: "
                "use --bf16 (or fp32)"
            )
        if getattr(c, "virtual_pipeline_model_parallel_size", None) not in (None, 1):
            problems.append(
                "virtual pipeline stages (--num-layers-per-virtual-pipeline-stage / "
                "--virtual-pipeline-model-parallel-size) are not supported by PACI yet: remove it"
            )
        if getattr(c, "variable_seq_lengths", False):
            problems.append(
                "variable sequence lengths are not supported by PACI yet: use a fixed "
                "--seq-length"
            )
        if getattr(c, "fp8", None):
            problems.append(
                "FP8 keeps a cached FP8 copy of each weight that a local update leaves stale: "
                "remove --fp8-format (use --bf16)"
            )
        if getattr(c, "mtp_num_layers", None):
            problems.append("multi-token prediction (--mtp-num-layers) is not supported by PACI")
        if getattr(c, "overlap_p2p_comm", False):
            problems.append("--overlap-p2p-communication is not supported by PACI: remove it")
        if getattr(c, "delay_wgrad_compute", False):
            problems.append("--delay-wgrad-compute is not supported by PACI: remove it")
        if getattr(c, "defer_embedding_wgrad_compute", False):
            problems.append("--defer-embedding-wgrad-compute is not supported by PACI: remove it")
    if problems:
        raise PACIConfigError(problems)
    return a
