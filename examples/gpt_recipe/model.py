"""Build one pipeline stage of a megatron-core GPT and its optimizer, Megatron-LM style.

Shared by ``examples/pretrain_gpt.py``, the benchmarks and the tests, so that every one
of them trains the same model the same way. Everything here is megatron-core: GPTModel
with the local layer spec (CPU) or the Transformer Engine spec (GPU), Megatron's
``DistributedDataParallel``, ``get_megatron_optimizer`` and ``OptimizerParamScheduler``.
Model parallel state (``parallel_state.initialize_model_parallel``) must be initialised.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence

import torch

__all__ = [
    "available_fusions",
    "stage_device",
    "transformer_config",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "forward_step",
    "loss_func",
    "microbatches",
    "model_parameters",
]


def available_fusions(on_gpu: bool) -> Dict[str, bool]:
    """The fused kernels megatron-core's local layer spec can run here, by
    ``TransformerConfig`` field: what Megatron-LM ends up with when Apex and Transformer
    Engine are absent (and uses where they are installed).

    - ``persist_layer_norm``: Apex's persistent layer norm (megatron-core's
      ``FusedLayerNorm``; torch's LayerNorm, the fallback, refuses the flag);
    - ``masked_softmax_fusion``: the compiled ``scaled_*masked_softmax_cuda`` kernels (Apex);
      without them megatron-core would fail at the first bf16/fp16 attention;
    - ``bias_activation_fusion``, ``bias_dropout_fusion``: megatron-core's own fused
      functions (``torch.compile`` / TorchScript), on any GPU;
    - ``gradient_accumulation_fusion``: off (it needs Apex's ``fused_weight_gradient_mlp_cuda``
      and writes ``main_grad`` inside backward: not run under PACI yet).

    All off on CPU.
    """
    import importlib.util

    def has(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    persist = False
    if on_gpu:
        from megatron.core.fusions import fused_layer_norm

        persist = bool(getattr(fused_layer_norm, "HAVE_PERSIST_LAYER_NORM", False))
    softmax = on_gpu and all(has(m) for m in ("scaled_upper_triang_masked_softmax_cuda",
                                              "scaled_masked_softmax_cuda",
                                              "scaled_softmax_cuda"))
    return {"persist_layer_norm": persist, "masked_softmax_fusion": softmax,
            "bias_activation_fusion": on_gpu, "bias_dropout_fusion": on_gpu,
            "gradient_accumulation_fusion": False}


def stage_device(device: str = "cuda") -> torch.device:
    """This rank's device: ``cuda:<current device>`` (``torch.cuda.set_device(LOCAL_RANK)``
    done first, as Megatron-LM does) or the CPU."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    pipeline_model_parallel_size: int = 1,
    tensor_model_parallel_size: int = 1,
    bf16: bool = False,
    ffn_hidden_size: Optional[int] = None,
    init_method_std: float = 0.02,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    recompute_granularity: Optional[str] = None,
    on_gpu: bool = False,
    **more,
):
    """megatron-core ``TransformerConfig`` for a GPT, from Megatron-LM's flag values.

    Fused kernels: those :func:`available_fusions` finds (all off on CPU, as Megatron-LM's
    ``--no-*-fusion`` flags). Weights are initialised on the CPU with ``on_gpu=False``, on
    the current CUDA device otherwise. ``more``: further ``TransformerConfig`` fields (MoE:
    ``num_moe_experts``, ``moe_router_topk``, ``moe_aux_loss_coeff``, ...), which override
    the fusions too.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    fields = dict(available_fusions(on_gpu), apply_rope_fusion=False,
                  deallocate_pipeline_outputs=True)
    fields.update(more)
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        tensor_model_parallel_size=tensor_model_parallel_size,
        init_method_std=init_method_std,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        use_cpu_initialization=not on_gpu,
        **fields,
    )


def build_model(
    config,
    *,
    vocab_size: int,
    max_position_embeddings: int,
    untie_embeddings_and_output_weights: bool = True,
    use_transformer_engine: bool = False,
    overlap_grad_reduce: bool = False,
    use_distributed_optimizer: bool = False,
    overlap_param_gather: bool = False,
    bucket_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> List[torch.nn.Module]:
    """This rank's GPT stage, wrapped like Megatron-LM's ``get_model``.

    The stage is moved to ``device`` (default: the CPU in CPU mode or without CUDA, else
    :func:`stage_device`) before it is wrapped, as ``get_model`` calls ``.cuda()``: layers
    megatron-core builds with torch defaults (layer norms, position embeddings) start on
    the CPU whatever ``use_cpu_initialization`` says. Then ``Float16Module`` for bf16 (and
    fp16) and
    megatron-core ``DistributedDataParallel`` with fp32 grad buffers (``overlap_*`` and
    ``bucket_size``, in parameters: its ``DistributedDataParallelConfig`` fields of those
    names). Returns the list of model chunks (one: no virtual pipeline).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_transformer_engine:
        layer_spec = specs.get_gpt_layer_with_transformer_engine_spec(num_experts=config.num_moe_experts)
    else:
        layer_spec = specs.get_gpt_layer_local_spec(num_experts=config.num_moe_experts)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not untie_embeddings_and_output_weights,
    )
    if device is None:
        device = stage_device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if config.bf16 or config.fp16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
        bucket_size=bucket_size,
    )
    model = DistributedDataParallel(config, ddp_config, model)
    return [model]


def build_optimizer(
    model: Sequence[torch.nn.Module],
    *,
    lr: float,
    min_lr: float = 0.0,
    weight_decay: float = 0.01,
    clip_grad: float = 1.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    bf16: bool = False,
    use_distributed_optimizer: bool = False,
    optimizer: str = "adam",
    muon: Optional[Dict[str, object]] = None,
):
    """megatron-core's optimizer for the model chunks, as Megatron-LM's ``--optimizer``.

    ``"adam"``: ``get_megatron_optimizer`` (AdamW with decoupled weight decay).
    ``"muon"``: megatron-core's Muon for the 2-D weights chained with Adam for the rest
    (embeddings, norms, biases), through :func:`paci_megatron.compat.get_megatron_muon_optimizer`;
    ``muon`` holds its ``OptimizerConfig`` fields (``muon_momentum``, ``muon_scale_mode``, ...).

    Raises:
        ImportError: ``"muon"`` without the emerging-optimizers package.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from paci_megatron import compat

    cfg = OptimizerConfig(
        optimizer=optimizer,  # "muon": from megatron-core 0.18 its registry reads this
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
        **(muon or {}),
    )
    if optimizer == "muon":
        return compat.get_megatron_muon_optimizer(cfg, list(model))
    return get_megatron_optimizer(cfg, list(model))


def build_scheduler(
    optimizer,
    *,
    lr: float,
    min_lr: float,
    train_samples: int,
    warmup_samples: int,
    decay_style: str = "cosine",
    weight_decay: float = 0.01,
):
    """Megatron's ``OptimizerParamScheduler`` counting samples (as Megatron-LM does)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_samples > 0 else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_samples,
        lr_decay_steps=max(train_samples, 1),
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(train_samples, 1),
        wd_incr_style="constant",
    )


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked mean of per-token cross entropy (Megatron's 2-output loss convention).

    Args:
        loss_mask: ``[b, s]`` float, 1 for tokens that count.
        output_tensor: ``[b, s]`` per-token losses from ``GPTModel(..., labels=...)``.

    Returns:
        ``(loss, {"lm loss": loss})``: the scalar loss megatron-core's ``forward_step``
        divides by the number of micro-batches, and a detached copy for logging.
    """
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * mask) / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    """Megatron ``forward_step_func`` for GPT.

    Reads a micro-batch on the first and last stage only (like Megatron-LM's
    ``get_batch``): a dict with ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    of shape ``[micro_batch_size, seq_length]``. Returns ``(output, loss_func)``.
    """
    from megatron.core import parallel_state as ps

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    tokens = labels = loss_mask = position_ids = None
    if first or last:
        batch = next(data_iterator)
        tokens, labels = batch["tokens"], batch["labels"]
        loss_mask, position_ids = batch["loss_mask"], batch["position_ids"]
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask)


def microbatches(
    dataset, micro_batch_size: int, *, dp_rank: int = 0, dp_size: int = 1, start_sample: int = 0,
    device: Optional[torch.device] = None,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless iterator of micro-batches over a megatron-core GPT dataset.

    Micro-batch ``i`` of DP rank ``r`` holds samples
    ``start + (i * dp_size + r) * mbs ... + mbs - 1`` (modulo the dataset length), so a
    run that resumes at ``start_sample`` sees the same data. Yields dicts of
    ``[micro_batch_size, seq_length]`` tensors (int64 tokens/labels/position_ids, float
    loss_mask) on ``device`` (default: the CPU), copied without a host wait as
    Megatron-LM's ``get_batch`` does; the causal attention mask is left to the model.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: prepare more data or lower --seq-length")
    i = 0
    while True:
        base = start_sample + (i * dp_size + dp_rank) * micro_batch_size
        samples = [dataset[(base + k) % n] for k in range(micro_batch_size)]
        yield {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device, non_blocking=True)
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
        i += 1


def model_parameters(model: Sequence[torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """Detached fp32 copies of every parameter, by name (for equality checks)."""
    out = {}
    for c, chunk in enumerate(model):
        for name, p in chunk.named_parameters():
            out[f"{c}.{name}"] = p.detach().float().clone()
    return out
