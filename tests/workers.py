"""Per-rank bodies of the multi-process tests (module level, so spawn can pickle them)."""

from __future__ import annotations

import functools
from typing import Dict, List

import torch

from harness import HostSyncCounter, seed_all, setup_parallel  # noqa: F401 (shared)

VOCAB, SEQ, MBS = 64, 16, 2


def synthetic_batches(n: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``n`` GPT micro-batches of random tokens, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append(
            {
                "tokens": seq[:, :-1].contiguous(),
                "labels": seq[:, 1:].contiguous(),
                "loss_mask": torch.ones(MBS, SEQ),
                "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ).contiguous(),
            }
        )
    return out


def build_tiny_gpt(pp: int, bf16: bool, seed: int = 1234, lr: float = 1e-2, clip_grad: float = 0.0,
                   num_layers: int = 4, tp: int = 1, dist_opt: bool = False,
                   overlap: bool = False, recompute=None, optimizer: str = "adam",
                   moe=None, tied: bool = False, overlap_param_gather: bool = False,
                   bucket_size=None, per_token_loss: bool = False):
    from gpt_recipe import model as gpt

    seed_all(seed)
    cfg = gpt.transformer_config(
        num_layers=num_layers, hidden_size=32, num_attention_heads=4,
        pipeline_model_parallel_size=pp, tensor_model_parallel_size=tp, bf16=bf16,
        recompute_granularity=recompute, **(moe or {}),
        **({"calculate_per_token_loss": True} if per_token_loss else {}),
    )
    model = gpt.build_model(cfg, vocab_size=VOCAB, max_position_embeddings=SEQ,
                            overlap_grad_reduce=overlap or overlap_param_gather,
                            use_distributed_optimizer=dist_opt,
                            overlap_param_gather=overlap_param_gather, bucket_size=bucket_size,
                            untie_embeddings_and_output_weights=not tied)
    opt = gpt.build_optimizer(model, lr=lr, clip_grad=clip_grad, bf16=bf16, weight_decay=0.0,
                              use_distributed_optimizer=dist_opt, optimizer=optimizer,
                              muon={"muon_momentum": 0.95} if optimizer == "muon" else None)
    return cfg, model, opt


def build_scheduler(opt, iters: int, m: int):
    """Warm-up over the first iteration, then cosine decay: every update gets another lr."""
    from gpt_recipe import model as gpt

    return gpt.build_scheduler(opt, lr=1e-2, min_lr=1e-3, train_samples=iters * m * MBS,
                               warmup_samples=m * MBS, decay_style="cosine", weight_decay=0.0)


def train_steps(model, opt, fb, it, iters: int, m: int, sched=None, drain_each=False,
                forward_step_func=None, seq_length=SEQ, micro_batch_size=MBS,
                between_calls=None):
    """Megatron-LM's train_step loop: zero grads, forward_backward_func, optimizer.step,
    scheduler.step. Returns ``[(loss dicts of the call, optimizer.step() result)]``."""
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    history = []
    for _ in range(iters):
        model[0].zero_grad_buffer()
        opt.zero_grad()
        out = fb(forward_step_func=forward_step_func or gpt.forward_step, data_iterator=it,
                 model=model, num_microbatches=m, seq_length=seq_length,
                 micro_batch_size=micro_batch_size, forward_only=False)
        if drain_each:
            fb.drain()
        history.append((out, opt.step()))
        if sched is not None:  # the samples of the iteration, over DP (Megatron-LM's)
            sched.step(increment=m * micro_batch_size * ps.get_data_parallel_world_size())
        if between_calls is not None:
            between_calls()
    return history


def losses_of(history) -> List[float]:
    return [float(d["lm loss"]) for out, _ in history for d in out]


def megatron_schedule(model):
    """megatron-core's own forward_backward_func, hooked up as Megatron-LM's train() does."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = model[0].config
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = model[0].no_sync
    return get_forward_backward_func()


def train_megatron_1f1b(model, opt, batches, iters: int, m: int, sched=None) -> List[float]:
    """Megatron-LM's train_step around megatron-core's own 1F1B schedule."""
    return losses_of(train_steps(model, opt, megatron_schedule(model), iter(batches), iters, m,
                                 sched))


def gpt_schedule_case(rank: int, world: int, bf16: bool, iters: int, m: int) -> dict:
    """Megatron 1F1B vs PACI (drained / continuous, a = m and a = 1) on one tiny GPT."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from gpt_recipe import model as gpt

    pp = world
    setup_parallel(pp)
    stage = ps.get_pipeline_model_parallel_rank()
    batches = synthetic_batches(m) * iters  # the same m micro-batches every iteration
    result: dict = {"stage": stage}

    # 1. Megatron's own 1F1B, with Megatron's LR scheduler (warm-up, then cosine).
    _, model, opt = build_tiny_gpt(pp, bf16)
    sched = build_scheduler(opt, iters, m)
    result["megatron_losses"] = train_megatron_1f1b(model, opt, batches, iters, m, sched)
    result["megatron_params"] = gpt.model_parameters(model)

    # 2. PACI with a drain after every call (a = m): must equal synchronous 1F1B, learning
    #    rate of every update included.
    _, model, opt = build_tiny_gpt(pp, bf16)
    sched = build_scheduler(opt, iters, m)
    popt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched)
    fb = pm.get_forward_backward_func(popt)
    history = train_steps(model, popt, fb, iter(batches), iters, m, sched, drain_each=True)
    result["drained_losses"] = losses_of(history)
    result["drained_lrs"] = [lr for _, lr, _ in popt.update_log]
    result["drained_params"] = gpt.model_parameters(model)
    result["drained_version"] = popt.version

    # 3./4. Continuous PACI, a world collective between every two calls.
    for name, a in (("a_eq_m", None), ("a_1", 1)):
        _, model, opt = build_tiny_gpt(pp, bf16)
        sched = build_scheduler(opt, iters, m)
        popt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched)
        fb = pm.PACISchedule(popt, pm.PACIConfig(accumulation=a), record_trace=True)
        def world_collective():  # what Megatron's loop does between calls
            flag = torch.tensor([1.0])
            torch.distributed.all_reduce(flag)
            assert flag.item() == world

        history = train_steps(model, popt, fb, iter(batches), iters, m, sched,
                              between_calls=world_collective)
        outs = [out for out, _ in history]
        grad_norm = history[-1][1][1]
        in_flight_before_drain = fb.in_flight
        fb.drain()
        result[name] = {
            "loss_dicts": [[{k: float(v) for k, v in d.items()} for d in o] for o in outs],
            "loss_types": sorted({type(d).__name__ for o in outs for d in o}),
            "drift": fb.telemetry.summary(),
            "drift_all": pm.telemetry.gather_drift(
                fb.telemetry, ps.get_pipeline_model_parallel_group()),
            "version": popt.version,
            "peak_in_flight": fb.peak_in_flight,
            "in_flight_before_drain": in_flight_before_drain,
            "in_flight_after_drain": fb.in_flight,
            "trace": pm.plan.format_actions(fb.trace),
            "lrs": [lr for _, lr, _ in popt.update_log],
            "grad_norm": grad_norm,
        }
    return result


# ------------------------------------------------------------------ toy pipeline
TOY_DIM, TOY_SEQ, TOY_MBS, TOY_LR = 8, 3, 2, 0.1


def toy_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=TOY_DIM, num_attention_heads=1,
                             pipeline_dtype=torch.float32,
                             use_cpu_initialization=True)


def make_toy_stage(stage: int, num_stages: int, stash: bool = False):
    """Two linears per stage; activations ``[TOY_SEQ, TOY_MBS, TOY_DIM]`` cross stages.

    ``stash=True`` computes with forward-time copies of the weights (weight stashing),
    the semantics PACI does NOT have; used only by the reference replay.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.module import MegatronModule

    class ToyStage(MegatronModule):
        def __init__(self):
            super().__init__(toy_config())
            from megatron.core.enums import ModelType

            self.model_type = ModelType.encoder_or_decoder
            torch.manual_seed(100 + stage)
            self.l1 = torch.nn.Linear(TOY_DIM, TOY_DIM)
            self.l2 = torch.nn.Linear(TOY_DIM, TOY_DIM)
            self.input_tensor = None

        def set_input_tensor(self, t):
            self.input_tensor = t[0] if isinstance(t, list) else t

        def _lin(self, layer, h):
            w, b = (layer.weight.clone(), layer.bias.clone()) if stash else (layer.weight, layer.bias)
            return F.linear(h, w, b)

        def forward(self, x=None, target=None):
            h = x if stage == 0 else self.input_tensor
            y = self._lin(self.l2, torch.tanh(self._lin(self.l1, h)))
            if stage == num_stages - 1:
                return ((y - target) ** 2).mean()
            return y

    return ToyStage()


def toy_batch(j: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + j)
    return {"x": torch.randn(TOY_SEQ, TOY_MBS, TOY_DIM, generator=g),
            "target": torch.randn(TOY_SEQ, TOY_MBS, TOY_DIM, generator=g)}


def toy_loss(output):
    return output, {"loss": output.detach().clone()}


def toy_forward_step(data_iterator, model):
    from megatron.core import parallel_state as ps

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    batch = next(data_iterator) if (first or last) else {}
    return model(batch.get("x"), batch.get("target")), toy_loss


def toy_paci_case(rank: int, world: int, m: int, a: int, calls: int, restore_versions: bool = True,
                  memory_mode: str = "activations", clip_grad: float = 0.0):
    """PACI on the toy pipeline through megatron-core DDP + SGD; returns final weights."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from paci_megatron import compat

    if not restore_versions:
        compat.set_version_counters = lambda tensors, versions: None
    setup_parallel(world)
    stage = ps.get_pipeline_model_parallel_rank()
    module = make_toy_stage(stage, world)
    model = [DistributedDataParallel(module.config, DistributedDataParallelConfig(), module)]
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=TOY_LR, weight_decay=0.0, sgd_momentum=0.0,
                        clip_grad=clip_grad), model)
    popt = pm.PACIOptimizer(opt, model)
    fb = pm.PACISchedule(popt, pm.PACIConfig(accumulation=a, memory_mode=memory_mode))
    it = (toy_batch(j) for j in range(10**6))
    # Megatron's train_step around the calls: its zero_grad calls must not wipe a window
    # that spans calls, its optimizer.step must not step again
    train_steps(model, popt, fb, it, calls, m, forward_step_func=toy_forward_step,
                seq_length=TOY_SEQ, micro_batch_size=TOY_MBS)
    fb.drain()
    return {"stage": stage, "params": {n: p.detach().clone() for n, p in module.named_parameters()},
            "drift": fb.telemetry.summary()}


def drain_decisions_case(rank: int, world: int, sync: int, interval: int, calls: int,
                         resume_at: int) -> dict:
    """The schedule's own drains on the toy pipeline (m = a = 2): after each training call,
    whether every stage is drained; from ``resume_at`` on, a fresh schedule continues from a
    drained state, as a resumed run does (its first call comes with no evaluation first)."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    setup_parallel(world)
    stage = ps.get_pipeline_model_parallel_rank()
    module = make_toy_stage(stage, world)
    model = [DistributedDataParallel(module.config, DistributedDataParallelConfig(), module)]
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=TOY_LR, weight_decay=0.0,
                                                 sgd_momentum=0.0), model)
    popt = pm.PACIOptimizer(opt, model)
    config = pm.PACIConfig(sync_warmup_iters=sync, drain_interval=interval)
    fb = pm.PACISchedule(popt, config)
    it = (toy_batch(j) for j in range(10**6))
    drained = []
    for call in range(1, calls + 1):
        if call == resume_at + 1:
            fb.drain()
            fb = pm.PACISchedule(popt, config)
            fb.load_state_dict(fb.drained_state(resume_at * 2, 2, resume_at))
        train_steps(model, popt, fb, it, 1, 2, forward_step_func=toy_forward_step,
                    seq_length=TOY_SEQ, micro_batch_size=TOY_MBS)
        drained.append((fb.iteration, fb.in_flight == 0 and not fb.has_unsent_gradient))
    return {"stage": stage, "drained": drained}


# ------------------------------------------------------------------ harness: 1F1B vs PP=1
def _global_name(name: str, layer_offset: int) -> str:
    """'module.module.decoder.layers.1.x' on a stage -> 'decoder.layers.<1+offset>.x'."""
    while name.startswith("module."):
        name = name[len("module."):]
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts)


def megatron_1f1b_case(rank: int, world: int, iters: int, m: int, init_state=None, num_layers=4):
    """Megatron's own schedule (1F1B for PP > 1, no pipelining for PP = 1) on CPU."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp = world
    setup_parallel(pp)
    stage = ps.get_pipeline_model_parallel_rank()
    _, model, opt = build_tiny_gpt(pp, bf16=False, num_layers=num_layers)
    offset = stage * (num_layers // pp)
    params = dict(model[0].named_parameters())
    initial = {_global_name(n, offset): p.detach().clone() for n, p in params.items()}
    if init_state is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(init_state[_global_name(n, offset)])
        opt.reload_model_params()
    losses = train_megatron_1f1b(model, opt, synthetic_batches(m) * iters, iters, m)
    return {
        "stage": stage,
        "schedule": get_forward_backward_func().__name__,
        "initial": initial,
        "params": {_global_name(n, offset): p.detach().clone() for n, p in params.items()},
        "losses": losses,
    }


def silent_peer_case(rank: int, world: int, m: int):
    """Stage 1 never joins the pipeline: stage 0 must fail with a named timeout."""
    import time

    import paci_megatron as pm
    from megatron.core import parallel_state as ps

    setup_parallel(world)
    _, model, opt = build_tiny_gpt(world, bf16=False)  # collective: both ranks build
    if ps.get_pipeline_model_parallel_rank() == 1:
        time.sleep(10)
        return "silent"
    fb = pm.PACISchedule(pm.PACIOptimizer(opt, model), pm.PACIConfig(p2p_timeout_s=3))
    t0 = time.monotonic()
    try:
        fb(forward_step_func=__import__("gpt_recipe.model").model.forward_step,
           data_iterator=iter(synthetic_batches(m)), model=model, num_microbatches=m,
           seq_length=SEQ, micro_batch_size=MBS)
    except pm.PACICommunicationError as err:
        import traceback

        return {"message": str(err), "seconds": time.monotonic() - t0,
                "printed": "".join(traceback.format_exception(err))}
    return "no error"


def single_stage_accumulation_case(rank: int, world: int, cases, iters: int):
    """P = 1: PACI with window a equals plain gradient accumulation over a micro-batches
    (Megatron's forward_backward_no_pipelining called with num_microbatches = a)."""
    setup_parallel(1)
    return [_single_stage(m, a, iters) for m, a in cases], _lr_after_loaded_scheduler()


def _lr_after_loaded_scheduler(m: int = 4, done: int = 5):
    """A scheduler restored at iteration `done` (and a fresh PACI state): update k uses
    the lr Megatron uses in iteration done + k, not the schedule's start."""
    import paci_megatron as pm
    from gpt_recipe import model as gpt

    _, model, opt = build_tiny_gpt(1, bf16=False)
    sched = build_scheduler(opt, 10, m)
    sched.step(increment=done * m * MBS)  # as after load_state_dict of iteration `done`
    expected = []
    for k in range(2):
        sched.num_steps, saved = (done + k) * m * MBS, sched.num_steps
        expected.append(sched.get_lr(opt.param_groups[0]))
        sched.num_steps = saved
    popt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched)
    fb = pm.PACISchedule(popt)
    it = (batch for batch in synthetic_batches(2 * m))
    for _ in range(2):
        fb(forward_step_func=gpt.forward_step, data_iterator=it, model=model,
           num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS)
        sched.step(increment=m * MBS)
    # the schedule does not keep the loop's data iterator (and a DataLoader's workers)
    # alive between calls
    import gc
    import weakref

    alive = weakref.ref(it)
    del it
    gc.collect()
    return {"expected": expected, "used": [lr for _, lr, _ in popt.update_log],
            "iterator_kept": alive() is not None}


def _single_stage(m: int, a: int, iters: int):
    import paci_megatron as pm
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gpt_recipe import model as gpt

    batches = synthetic_batches(m * iters, seed=7)
    # reference: one optimizer step per a micro-batches
    _, model, opt = build_tiny_gpt(1, bf16=False)
    train_steps(model, opt, get_forward_backward_func(), iter(batches), m * iters // a, a)
    reference = gpt.model_parameters(model)
    # PACI, P = 1, window a, calls of m micro-batches
    _, model, opt = build_tiny_gpt(1, bf16=False)
    popt = pm.PACIOptimizer(opt, model)
    sched = pm.PACISchedule(popt, pm.PACIConfig(accumulation=a))
    train_steps(model, popt, sched, iter(batches), iters, m)
    sched.drain()
    return {"reference": reference, "paci": gpt.model_parameters(model), "version": popt.version}


# ------------------------------------------------------------------ composition with DP / TP
def composition_case(rank: int, world: int, pp: int, tp: int, dist_opt: bool, overlap: bool,
                     bf16: bool, iters: int, m: int, recompute=None,
                     memory_mode: str = "activations", tied: bool = False) -> dict:
    """Megatron 1F1B vs PACI drained after every call, on PP x TP x DP; plus stage norms."""
    import math

    import paci_megatron as pm
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    setup_parallel(pp, tp)
    dp_rank = ps.get_data_parallel_rank()
    batches = synthetic_batches(m, seed=11 + dp_rank) * iters  # each DP replica its own data
    kw = dict(tp=tp, dist_opt=dist_opt, overlap=overlap, recompute=recompute, tied=tied)
    out = {"stage": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
           "dp_rank": dp_rank}

    _, model, opt = build_tiny_gpt(pp, bf16, **kw)
    history = train_steps(model, opt, megatron_schedule(model), iter(batches), iters, m)
    out["megatron_params"] = gpt.model_parameters(model)
    out["megatron_norms"] = [grad_norm for _, (_, grad_norm, _) in history]

    paci = pm.PACIConfig(memory_mode=memory_mode)
    _, model, opt = build_tiny_gpt(pp, bf16, **kw)
    popt = pm.PACIOptimizer(opt, model)
    sched = pm.PACISchedule(popt, paci)
    history = train_steps(model, popt, sched, iter(batches), iters, m, drain_each=True)
    stage_norms = [grad_norm for _, (_, grad_norm, _) in history]
    out["paci_params"] = gpt.model_parameters(model)
    # combine the stage-local norms over the pipeline: sqrt(sum_s norm_s^2)
    gathered = [None] * pp
    torch.distributed.all_gather_object(gathered, stage_norms,
                                        group=ps.get_pipeline_model_parallel_group())
    out["combined_norms"] = [math.sqrt(sum(g[k] ** 2 for g in gathered)) for k in range(iters)]

    # continuous PACI on the same composition, with the look-ahead: trains and reaches the
    # drift bound, and the look-ahead's weights reach every data-parallel replica alike
    _, model, opt = build_tiny_gpt(pp, bf16, **kw)
    popt = pm.PACIOptimizer(opt, model, lookahead=1.0)
    sched = pm.PACISchedule(popt, paci)
    train_steps(model, popt, sched, iter(batches), iters, m)
    out["continuous_params_ahead"] = gpt.model_parameters(model)  # before the drain
    sched.drain()
    out["continuous_drift"] = sched.telemetry.summary()
    out["continuous_version"] = popt.version
    out["continuous_params"] = gpt.model_parameters(model)
    return out


# ------------------------------------------------------------------ checkpoint and resume
def _make_run(world: int, bf16: bool, seed: int, total_iters: int, m: int):
    """(model, PACIOptimizer, scheduler, PACISchedule) for the checkpoint tests."""
    import paci_megatron as pm

    _, model, opt = build_tiny_gpt(world, bf16, seed=seed)
    sched = build_scheduler(opt, total_iters, m)
    popt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched)
    return model, popt, sched, pm.PACISchedule(popt)


def _train_run(run, it, iters: int, m: int) -> None:
    """Megatron's train_step loop around PACI for `iters` iterations."""
    model, popt, sched, fb = run
    train_steps(model, popt, fb, it, iters, m, sched)


def resume_case(rank: int, world: int, bf16: bool, n: int, k: int, m: int, ckpt_dir: str):
    """Train n, drain, save, stop; load into a fresh model and train k more; compare
    with an uninterrupted run that drains at the same iteration."""
    from gpt_recipe import model as gpt
    from gpt_recipe.checkpoint import latest_iteration, load_checkpoint, save_checkpoint

    setup_parallel(world)
    batches = synthetic_batches(m * (n + k), seed=3)

    def make(seed):
        return _make_run(world, bf16, seed, n + k, m)

    def train(run, it, iters):
        _train_run(run, it, iters, m)

    out = {}
    run, it = make(1234), iter(batches)
    train(run, it, n)
    run[3].drain()
    train(run, it, k)
    run[3].drain()
    out["uninterrupted"] = gpt.model_parameters(run[0])
    out["uninterrupted_drift"] = run[3].telemetry.summary()

    run, it = make(1234), iter(batches)
    train(run, it, n)
    try:  # saving with micro-batches in flight is refused
        save_checkpoint(ckpt_dir, n, run[0], run[1], run[2], run[3])
        out["refused_in_flight"] = None
    except RuntimeError as err:
        out["refused_in_flight"] = str(err)
    torch.distributed.barrier()
    run[3].drain()
    save_checkpoint(ckpt_dir, n, run[0], run[1], run[2], run[3], extra={"consumed": n * m})
    del run, it

    run = make(999)  # a different initialisation: everything must come from the checkpoint
    info = load_checkpoint(ckpt_dir, run[0], run[1], run[2], run[3])
    out["loaded"] = info
    it = iter(batches[info["extra"]["consumed"]:])
    train(run, it, k)
    run[3].drain()
    out["resumed"] = gpt.model_parameters(run[0])
    out["resumed_drift"] = run[3].telemetry.summary()
    out["version"] = run[1].version

    # a checkpoint with non-finite weights (on the last stage only) is refused on every
    # rank, and the last good one kept
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage():
        with torch.no_grad():
            next(run[0][0].parameters()).fill_(float("nan"))
    try:
        save_checkpoint(ckpt_dir, n + k, run[0], run[1], run[2], run[3])
        out["refused_nan"] = None
    except RuntimeError as err:
        out["refused_nan"] = str(err)
    torch.distributed.barrier()
    out["latest"] = latest_iteration(ckpt_dir)
    return out


def nan_gradient_case(rank: int, world: int, skip: bool):
    """A NaN enters stage 1's gradient during micro-batch 4 (toy pipeline, P = 3, m = a = 3)."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    setup_parallel(world)
    stage = ps.get_pipeline_model_parallel_rank()
    module = make_toy_stage(stage, world)
    poison = {"on": False}
    if stage == 1:
        module.l1.weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)
    model = [DistributedDataParallel(module.config, DistributedDataParallelConfig(), module)]
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=TOY_LR, weight_decay=0.0,
                                                 sgd_momentum=0.0, clip_grad=0.0), model)
    popt = pm.PACIOptimizer(opt, model, skip_nonfinite_updates=skip)
    fb = pm.PACISchedule(popt, pm.PACIConfig(p2p_timeout_s=20))
    it = (toy_batch(j) for j in range(10**6))
    original_backward = fb._backward

    def backward(action, ctx, closes_window):
        poison["on"] = action.index == 4
        return original_backward(action, ctx, closes_window)

    fb._backward = backward
    for _ in range(3):
        fb(forward_step_func=toy_forward_step, data_iterator=it, model=model,
           num_microbatches=3, seq_length=TOY_SEQ, micro_batch_size=TOY_MBS)
    fb.drain()
    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    return {"stage": stage, "skipped": popt.skipped_updates, "finite": finite,
            "version": popt.version}


def crash_during_save_case(rank: int, world: int, n: int, k: int, m: int, ckpt_dir: str):
    """Save at n, train k more, then die in the middle of writing the next checkpoint."""
    import os

    from gpt_recipe.checkpoint import save_checkpoint

    setup_parallel(world)
    batches = synthetic_batches(m * (n + k), seed=3)
    run, it = _make_run(world, False, 1234, n + k, m), iter(batches)
    _train_run(run, it, n, m)
    run[3].drain()
    save_checkpoint(ckpt_dir, n, run[0], run[1], run[2], run[3], extra={"consumed": n * m})
    _train_run(run, it, k, m)
    run[3].drain()

    def dying_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        os._exit(17)  # the machine goes away mid-write

    torch.save = dying_save
    save_checkpoint(ckpt_dir, n + k, run[0], run[1], run[2], run[3])
    return "not reached"


def resume_after_crash_case(rank: int, world: int, n: int, k: int, m: int, ckpt_dir: str):
    """Load the latest good checkpoint and train k more; also the uninterrupted run."""
    from gpt_recipe import model as gpt
    from gpt_recipe.checkpoint import latest_iteration, load_checkpoint

    setup_parallel(world)
    batches = synthetic_batches(m * (n + k), seed=3)
    out = {"latest": latest_iteration(ckpt_dir)}
    run = _make_run(world, False, 999, n + k, m)
    info = load_checkpoint(ckpt_dir, run[0], run[1], run[2], run[3])
    _train_run(run, iter(batches[info["extra"]["consumed"]:]), k, m)
    run[3].drain()
    out["resumed"] = gpt.model_parameters(run[0])
    run, it = _make_run(world, False, 1234, n + k, m), iter(batches)
    _train_run(run, it, n, m)
    run[3].drain()
    _train_run(run, it, k, m)
    run[3].drain()
    out["uninterrupted"] = gpt.model_parameters(run[0])
    return out


def midflight_change_case(rank: int, world: int, what: str):
    """Change the sequence length (``what = "seq"``) while micro-batches are in flight."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    assert what == "seq", what
    setup_parallel(world)
    _, model, opt = build_tiny_gpt(world, bf16=False)
    fb = pm.PACISchedule(pm.PACIOptimizer(opt, model))
    it = iter(synthetic_batches(8))
    fb(forward_step_func=gpt.forward_step, data_iterator=it, model=model, num_microbatches=4,
       seq_length=SEQ, micro_batch_size=MBS)
    try:
        fb(forward_step_func=gpt.forward_step, data_iterator=it, model=model,
           micro_batch_size=MBS, num_microbatches=4, seq_length=SEQ // 2)
        return "accepted"
    except pm.PACIConfigError as err:
        message = str(err)
    return {"stage": ps.get_pipeline_model_parallel_rank(), "message": message}


def ramp_case(rank: int, world: int, ms: List[int], pp: int = 2, composed: bool = False) -> dict:
    """A batch-size ramp (Megatron-LM's --rampup-batch-size or --step-batch-size-schedule):
    iteration i runs ``ms[i]`` micro-batches, with an LR schedule in samples. Megatron's
    1F1B; PACI drained after each call; continuous PACI (a = m, so the windows grow);
    continuous PACI drained by hand before each change of m. ``composed``: bf16, tied
    embeddings and the distributed optimizer (over DP = world / pp)."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    setup_parallel(pp)
    dp_rank = ps.get_data_parallel_rank()
    out = {"stage": ps.get_pipeline_model_parallel_rank(), "dp_rank": dp_rank}
    batches = synthetic_batches(sum(ms), seed=dp_rank)

    def run(paci: bool, drain_each=False, drain_at_change=False):
        _, model, opt = build_tiny_gpt(pp, composed, tied=composed, dist_opt=composed)
        dp = ps.get_data_parallel_world_size()
        sched = gpt.build_scheduler(opt, lr=1e-2, min_lr=1e-3, train_samples=sum(ms) * MBS * dp,
                                    warmup_samples=ms[0] * MBS * dp)
        if paci:
            opt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched)
            fb = pm.PACISchedule(opt, pm.PACIConfig())
        else:
            fb = megatron_schedule(model)
        it, losses = iter(batches), []
        for i, m in enumerate(ms):
            if drain_at_change and i and m != ms[i - 1]:
                fb.drain()
            losses += losses_of(train_steps(model, opt, fb, it, 1, m, sched, drain_each=drain_each))
        if paci:
            fb.drain()
        return losses, gpt.model_parameters(model), fb

    out["megatron"] = run(False)[:2]
    out["drained"] = run(True, drain_each=True)[:2]
    losses, params, fb = run(True)
    out["continuous"] = (losses, params, fb.telemetry.summary(), fb.replans)
    out["by_hand"] = run(True, drain_at_change=True)[:2]
    return out


# ------------------------------------------------------------------ staleness mitigations
def mitigation_case(rank: int, world: int, optimizer: str, iters: int, m: int, sync: int) -> dict:
    """Megatron 1F1B against PACI on one tiny GPT, both with ``optimizer`` (adam or muon):
    PACI drained after every call (with and without the look-ahead), and PACI with a
    synchronous warm-up of ``sync`` iterations, parameters snapshot after each iteration."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    setup_parallel(world)
    out = {"stage": ps.get_pipeline_model_parallel_rank()}
    batches = synthetic_batches(m) * iters

    def run(schedule_of, drain_each=False):
        from paci_megatron import internals

        _, model, opt = build_tiny_gpt(world, False, optimizer=optimizer)
        out["inner_optimizers"] = sorted({type(o.optimizer).__name__
                                          for o in internals.inner_optimizers(opt)})
        sched = build_scheduler(opt, iters, m)
        opt, fb = schedule_of(model, opt, sched)
        snapshots = []
        history = train_steps(model, opt, fb, iter(batches), iters, m, sched,
                              drain_each=drain_each,
                              between_calls=lambda: snapshots.append(gpt.model_parameters(model)))
        if hasattr(fb, "drain"):
            fb.drain()
        return losses_of(history), snapshots, gpt.model_parameters(model), fb

    def paci(config, lookahead=0.0):
        def make(model, opt, sched):
            popt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched, lookahead=lookahead)
            return popt, pm.PACISchedule(popt, config)
        return make

    out["megatron"] = run(lambda model, opt, sched: (opt, megatron_schedule(model)))[:3]
    for name, lookahead in (("drained", 0.0), ("drained_lookahead", 1.0)):
        losses, snaps, params, fb = run(paci(pm.PACIConfig(), lookahead), drain_each=True)
        out[name] = (losses, snaps, params)
    losses, snaps, params, fb = run(paci(pm.PACIConfig(), lookahead=1.0))
    out["continuous_lookahead"] = (losses, fb.telemetry.summary(), params)
    out["continuous"] = run(paci(pm.PACIConfig()))[0]
    losses, snaps, params, fb = run(paci(pm.PACIConfig(sync_warmup_iters=sync)))
    out["sync"] = (losses, snaps, params)
    out["sync_drift"] = fb.telemetry.summary()
    out["sync_trace_versions"] = fb.optimizer.version
    return out


def lookahead_update_case(rank: int, world: int) -> dict:
    """The look-ahead on one toy stage with plain SGD: weights after each local update and
    after settle(), for hand-computed expectations."""
    import paci_megatron as pm
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    setup_parallel(1)
    module = make_toy_stage(0, 1)
    model = [DistributedDataParallel(module.config, DistributedDataParallelConfig(), module)]
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=TOY_LR, weight_decay=0.0,
                                                 sgd_momentum=0.0, clip_grad=0.0), model)
    popt = pm.PACIOptimizer(opt, model, lookahead=2.0)
    weight = module.l1.weight
    seen = {"start": weight.detach().clone()}
    grads = []
    for k in (1, 2, 3):
        g = torch.full_like(weight, float(k))
        grads.append(g)
        model[0].zero_grad_buffer()
        weight.main_grad.copy_(g)
        popt.local_update(pm.optimizer.Window(update=k, first_microbatch=k - 1, size=1,
                                              samples_per_microbatch=1, num_microbatches=1,
                                              mean_drift=0.25))
        seen[f"after {k}"] = weight.detach().clone()
    popt.settle()
    seen["settled"] = weight.detach().clone()
    seen["grads"] = grads
    return seen


class RecordingTimers:
    """Megatron's ``config.timers`` stand-in: records what is started and stopped."""

    def __init__(self):
        self.events = []

    def __call__(self, name, log_level=None):
        timers = self

        class _Timer:
            def start(self, barrier=False):
                timers.events.append(("start", name, barrier))

            def stop(self, barrier=False):
                timers.events.append(("stop", name))

        return _Timer()


def timers_case(rank: int, world: int, calls: int):
    """A single-stage PACI run under Megatron's timers: which ones the schedule drives."""
    import paci_megatron as pm

    from gpt_recipe import model as gpt

    setup_parallel(1)
    _, model, opt = build_tiny_gpt(1, bf16=False)
    timers = RecordingTimers()
    model[0].config.timers = timers
    for inner in getattr(opt, "chained_optimizers", [opt]):  # Megatron-LM's L1 timer setup
        inner.config.timers, inner.config.barrier_with_L1_time = timers, True
    fb = pm.PACISchedule(pm.PACIOptimizer(opt, model))
    it = iter(synthetic_batches(4 * calls))
    for _ in range(calls):
        fb(forward_step_func=gpt.forward_step, data_iterator=it, model=model,
           num_microbatches=4, seq_length=SEQ, micro_batch_size=MBS)
    return timers.events


# ------------------------------------------------------------------ host syncs
def host_sync_case(rank: int, world: int, m: int, warmup_calls: int, calls: int,
                   overlap_param_gather: bool = False, per_token_loss: bool = False) -> dict:
    """Continuous PACI (a = m) on a tiny GPT: host syncs counted over ``calls`` steady-state
    calls (after ``warmup_calls``), by source; the updates those calls made.
    ``overlap_param_gather``: with the distributed optimizer and its gather in forward
    pre-hooks (small buckets: a chain of them). ``per_token_loss``: Megatron-LM's 3-output
    loss with ``calculate_per_token_loss`` (token counts travel with the gradients)."""
    import paci_megatron as pm

    from gpt_recipe import model as gpt

    setup_parallel(world)
    _, model, opt = build_tiny_gpt(world, bf16=False, clip_grad=1.0,
                                   dist_opt=overlap_param_gather,
                                   overlap_param_gather=overlap_param_gather,
                                   bucket_size=2000 if overlap_param_gather else None,
                                   per_token_loss=per_token_loss)
    popt = pm.PACIOptimizer(opt, model)
    fb = pm.PACISchedule(popt)
    it = iter(masked_batches(m * (warmup_calls + calls), seed=3) if per_token_loss
              else synthetic_batches(m * (warmup_calls + calls)))
    step = per_token_forward_step if per_token_loss else None
    train_steps(model, popt, fb, it, warmup_calls, m, forward_step_func=step)
    updates_before = popt.version
    with HostSyncCounter() as counter:
        train_steps(model, popt, fb, it, calls, m, forward_step_func=step)
    return {"counts": counter.counts, "updates": popt.version - updates_before,
            "microbatches": m * calls}


#: a tiny MoE: 4 experts, top-2, load-balancing aux loss, aux-loss-free expert bias
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=1e-2,
           moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="alltoall",
           moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
           moe_router_bias_update_rate=1e-2, add_bias_linear=False)


def moe_case(rank: int, world: int, pp: int, iters: int, m: int, ep: int = 1) -> dict:
    """A tiny MoE GPT: Megatron's 1F1B, drained PACI (a = m), continuous PACI (a = m);
    ``ep``: expert parallelism (DP = world / pp >= ep; each DP replica its own data)."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from gpt_recipe import model as gpt

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16 without TE: unbound
        moe_utils.te_general_gemm = None
    setup_parallel(pp, ep=ep)
    batches = synthetic_batches(m, seed=ps.get_data_parallel_rank()) * iters
    out: dict = {"stage": ps.get_pipeline_model_parallel_rank(),
                 "dp_rank": ps.get_data_parallel_rank()}
    moe = dict(MOE, expert_model_parallel_size=ep,
               moe_token_dispatcher_type="allgather" if ep > 1 else "alltoall")
    _, model, opt = build_tiny_gpt(pp, False, moe=moe)
    out["megatron_losses"] = train_megatron_1f1b(model, opt, batches, iters, m)
    out["megatron_params"] = gpt.model_parameters(model)
    out["megatron_bias"] = _expert_biases(model)
    for name, drained in (("drained", True), ("continuous", False)):
        _, model, opt = build_tiny_gpt(pp, False, moe=moe)
        popt = pm.PACIOptimizer(opt, model)
        fb = pm.PACISchedule(popt)
        history = train_steps(model, popt, fb, iter(batches), iters, m, drain_each=drained)
        out[f"{name}_drift"] = fb.telemetry.summary()["max"]
        fb.drain()
        out[f"{name}_losses"] = losses_of(history)
        out[f"{name}_params"] = gpt.model_parameters(model)
        out[f"{name}_bias"] = _expert_biases(model)
    return out


def _expert_biases(model) -> List[torch.Tensor]:
    return [m.expert_bias.detach().clone() for chunk in model for m in chunk.modules()
            if getattr(m, "expert_bias", None) is not None]


class MultiModuleProcessGroupCollection:
    """Stands in for megatron-core 0.17+'s class of that name (refused by its name)."""


def process_group_collection_case(rank: int, world: int, iters: int, m: int) -> dict:
    """PACI called as Megatron-LM 0.19+ calls a schedule: with ``pg_collection`` and
    ``p2p_communicator`` built on a pipeline group of their own (same ranks, another object
    than ``parallel_state``'s). Drained, it must equal Megatron's 1F1B given the same."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.process_groups_config import ProcessGroupCollection

    setup_parallel(world)
    batches = synthetic_batches(m) * iters
    own_pp = torch.distributed.new_group(list(range(world)))
    own = {}  # TP and CP groups of one rank each (TP = CP = 1), other objects than parallel_state's
    for name in ("tp", "cp"):
        for r in range(world):  # every rank takes part in creating every group
            group = torch.distributed.new_group([r])
            if r == rank:
                own[name] = group
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    pgc.pp, pgc.tp, pgc.cp = own_pp, own["tp"], own["cp"]
    result: dict = {"stage": ps.get_pipeline_model_parallel_rank(), "groups_are_others": (
        own_pp is not ps.get_pipeline_model_parallel_group()
        and own["tp"] is not ps.get_tensor_model_parallel_group()
        and own["cp"] is not ps.get_context_parallel_group())}

    def groups_kwargs(model):
        return {"pg_collection": pgc, "p2p_communicator": P2PCommunicator(
            pp_group=own_pp, config=model[0].config)}

    _, model, opt = build_tiny_gpt(world, False)
    fb = megatron_schedule(model)
    result["megatron"] = losses_of(train_steps(
        model, opt, functools.partial(fb, **groups_kwargs(model)), iter(batches), iters, m))

    _, model, opt = build_tiny_gpt(world, False)
    popt = pm.PACIOptimizer(opt, model)
    fb = pm.PACISchedule(popt)
    try:  # refused before any work: nothing is bound to the optimizer yet
        train_steps(model, popt, functools.partial(fb, pg_collection=MultiModuleProcessGroupCollection()),
                    iter(batches), 1, m)
    except pm.PACIConfigError as e:
        result["refusal"] = str(e)
    result["bound_after_refusal"] = (popt._stage_state is not None or  # attached, or guarded
                                     "PACISchedule" in model[0].zero_grad_buffer.__qualname__)
    call = functools.partial(fb, **groups_kwargs(model))
    call.drain = fb.drain
    result["drained"] = losses_of(train_steps(model, popt, call, iter(batches), iters, m,
                                              drain_each=True))
    result["guarded_after_a_call"] = "PACISchedule" in model[0].zero_grad_buffer.__qualname__
    result["paci_groups_are_the_collections"] = (fb._run.p2p.pp_group is own_pp and
                                                 fb._tp_group is own["tp"] and fb._cp_group is own["cp"])
    try:  # and on every later call
        fb(forward_step_func=None, data_iterator=None, model=model, num_microbatches=m,
           seq_length=SEQ, micro_batch_size=MBS, pg_collection=MultiModuleProcessGroupCollection())
    except pm.PACIConfigError as e:
        result["later_refusal"] = str(e)
    return result


def tied_embedding_case(rank: int, world: int, bf16: bool, iters: int, m: int,
                        accumulations=(None, 1), optimizer: str = "adam") -> dict:
    """Tied embeddings: Megatron 1F1B vs drained PACI (bits), then continuous PACI at each
    accumulation factor (tied lag, both copies after the drain)."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from gpt_recipe import model as gpt
    from paci_megatron.tied import find_tied_embedding

    pp = world
    setup_parallel(pp)
    stage = ps.get_pipeline_model_parallel_rank()
    batches = synthetic_batches(m) * iters
    result: dict = {"stage": stage}

    def tied_weight(model):
        found = find_tied_embedding(model)
        return None if found is None else found[0].detach().float().clone()

    _, model, opt = build_tiny_gpt(pp, bf16, tied=True, optimizer=optimizer)
    result["initial_tied"] = tied_weight(model)
    sched = build_scheduler(opt, iters, m)
    result["megatron_losses"] = train_megatron_1f1b(model, opt, batches, iters, m, sched)
    result["megatron_params"] = gpt.model_parameters(model)

    _, model, opt = build_tiny_gpt(pp, bf16, tied=True, optimizer=optimizer)
    sched = build_scheduler(opt, iters, m)
    popt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched)
    result["has_tied"] = popt.tied is not None
    fb = pm.get_forward_backward_func(popt)
    history = train_steps(model, popt, fb, iter(batches), iters, m, sched, drain_each=True)
    result["drained_losses"] = losses_of(history)
    result["drained_params"] = gpt.model_parameters(model)

    for a in accumulations:
        _, model, opt = build_tiny_gpt(pp, bf16, tied=True, optimizer=optimizer)
        sched = build_scheduler(opt, iters, m)
        popt = pm.PACIOptimizer(opt, model, opt_param_scheduler=sched)
        fb = pm.PACISchedule(popt, pm.PACIConfig(accumulation=a))
        history = train_steps(model, popt, fb, iter(batches), iters, m, sched)
        tied_before_drain = None if popt.tied is None else popt.tied.version
        version_before_drain = popt.version
        fb.drain()
        result[f"a={a}"] = {
            "losses": losses_of(history),
            "drift": fb.telemetry.summary(),
            "version": popt.version,
            "tied_version_before_drain": tied_before_drain,
            "version_before_drain": version_before_drain,
            "tied_version": None if popt.tied is None else popt.tied.version,
            "tied": tied_weight(model),
        }
    return result


# ------------------------------------------------------------------ --overlap-param-gather
class GatherChecker:
    """Records every read of a parameter whose distributed-optimizer all-gather had not
    finished: a forward pre-hook on every module, registered after megatron-core's own
    (which wait), and a gradient hook on every parameter (its backward read the weight).
    A bucket group's parameters are gathered when its gather was dispatched since the
    last ``finish_grad_sync`` and its handle was waited for."""

    def __init__(self, chunk):
        self.groups = chunk.param_to_bucket_group
        self.names = {p: n for n, p in chunk.named_parameters()}
        self.violations: List[str] = []
        self.forward_checks = self.backward_checks = 0
        for module in chunk.module.modules():
            module.register_forward_pre_hook(self._forward)
        for p in self.names:
            if p in self.groups:
                p.register_hook(functools.partial(self._backward, p))

    def _stale(self, p) -> bool:
        g = self.groups[p]
        return not g.param_gather_dispatched or g.param_gather_handle is not None

    def _forward(self, module, *unused):
        for p in module.parameters(recurse=False):
            if p in self.groups:
                self.forward_checks += 1
                if self._stale(p):
                    self.violations.append("forward read " + self.names[p])

    def _backward(self, p, grad):
        self.backward_checks += 1
        if self._stale(p):
            self.violations.append("backward read " + self.names[p])


def overlap_param_gather_case(rank: int, world: int, pp: int, bf16: bool, tied: bool,
                              iters: int, m: int, moe: bool = False, tp: int = 1) -> dict:
    """PP x TP x DP 2, distributed optimizer, small buckets (several gather chains): the same runs
    with and without ``overlap_param_gather``, each checked by :class:`GatherChecker`:

    - Megatron's 1F1B vs drained PACI (a = m);
    - drained PACI at a = 1 (cool-down backwards right after local updates);
    - continuous PACI with the look-ahead (a = m), drained at the end;
    - the same with megatron-core's forward pre-hooks removed (Megatron-LM's first
      iteration), where PACI's own synchronous gather is all that keeps forwards right,
      and with ``align_param_gather`` (hooks that dispatch nothing);
    - a = 1 drained again with the schedule's wait removed: what the checker then sees.

    ``moe``: a tiny MoE (a dense and an expert distributed optimizer over the same chunks,
    each with its own bucket groups)."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    setup_parallel(pp, tp)
    dp_rank = ps.get_data_parallel_rank()
    batches = synthetic_batches(m, seed=5 + dp_rank) * iters
    out: dict = {"stage": ps.get_pipeline_model_parallel_rank(), "dp_rank": dp_rank,
                 "tp_rank": ps.get_tensor_model_parallel_rank()}
    kw = dict(dist_opt=True, bucket_size=2000, tied=tied, tp=tp)
    if moe:
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16 without TE
            moe_utils.te_general_gemm = None
        kw["moe"] = dict(MOE, moe_token_dispatcher_type="alltoall")

    def build(overlap, hooks=True, align=False):
        _, model, opt = build_tiny_gpt(pp, bf16, overlap_param_gather=overlap, overlap=True, **kw)
        model[0].ddp_config.align_param_gather = align  # read by the hooks at each call
        checker = None
        if overlap:
            if not hooks:
                model[0].disable_forward_pre_hook(param_sync=False)
            model[0].start_param_sync(force_sync=True)  # the initial weights count as gathered
            checker = GatherChecker(model[0])
        out.setdefault("bucket_groups", len(model[0].bucket_groups))
        return model, opt, checker

    def paci_run(name, overlap, a, drain_each, lookahead=0.0, hooks=True, no_wait=False,
                 align=False):
        model, opt, checker = build(overlap, hooks, align)
        popt = pm.PACIOptimizer(opt, model, lookahead=lookahead)
        sched = pm.PACISchedule(popt, pm.PACIConfig(accumulation=a))
        if no_wait:
            popt.finish_param_gather = lambda params=None: None
        history = train_steps(model, popt, sched, iter(batches), iters, m, drain_each=drain_each)
        sched.drain()
        if no_wait:  # what a drain's end would have waited for, so the weights can be read
            from paci_megatron import internals
            internals.finish_param_gather(model)
        out[name + "_losses"] = losses_of(history)
        out[name + "_params"] = gpt.model_parameters(model)
        out[name + "_version"] = popt.version
        if checker is not None:
            out[name + "_violations"] = checker.violations[:5]
            out[name + "_checks"] = (checker.forward_checks, checker.backward_checks)

    for overlap in (False, True):
        tag = "overlap" if overlap else "sync"
        model, opt, checker = build(overlap)
        history = train_steps(model, opt, megatron_schedule(model), iter(batches), iters, m)
        if overlap:
            out["megatron_overlap_violations"] = checker.violations[:5]
            model[0].start_param_sync(force_sync=True)  # its last step's gather
        out[f"megatron_{tag}_losses"] = losses_of(history)
        out[f"megatron_{tag}_params"] = gpt.model_parameters(model)
        paci_run(f"drained_{tag}", overlap, a=m, drain_each=True)
        paci_run(f"a1_{tag}", overlap, a=1, drain_each=True)
        paci_run(f"continuous_{tag}", overlap, a=m, drain_each=False, lookahead=1.0)
    paci_run("nohooks_sync", False, a=1, drain_each=False, lookahead=1.0)
    paci_run("nohooks_overlap", True, a=1, drain_each=False, lookahead=1.0, hooks=False)
    paci_run("nowait_overlap", True, a=1, drain_each=True, no_wait=True)
    # align_param_gather: megatron-core's hooks dispatch nothing; PACI starts every gather
    paci_run("align_overlap", True, a=m, drain_each=False, lookahead=1.0, align=True)
    return out


# ------------------------------------------------------------------ --calculate-per-token-loss
def masked_batches(n: int, seed: int) -> List[Dict[str, torch.Tensor]]:
    """``n`` micro-batches whose loss masks keep very different token counts: micro-batch
    ``i`` keeps a fraction between 3% and 100% of its ``MBS x SEQ`` tokens."""
    g = torch.Generator().manual_seed(seed)
    out = synthetic_batches(n, seed)
    for batch in out:
        keep = float(torch.empty(()).uniform_(0.03, 1.0, generator=g))
        batch["loss_mask"] = (torch.rand(MBS, SEQ, generator=g) < keep).float()
    return out


def per_token_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's 3-output loss: ``(sum of masked token losses, token count, report)``."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1),
                                                    num_tokens.float().view(1)])}


def per_token_forward_step(data_iterator, model):
    from gpt_recipe import model as gpt

    output, loss = gpt.forward_step(data_iterator, model)
    return output, functools.partial(per_token_loss_func, *loss.args)


def per_token_loss_case(rank: int, world: int, pp: int, bf16: bool, tied: bool, dist_opt: bool,
                        iters: int, m: int, tp: int = 1) -> dict:
    """``calculate_per_token_loss`` on micro-batches of very different token counts:
    Megatron's 1F1B vs drained PACI (a = m); continuous PACI at a = m / 2 with every
    update's window and token count recorded on every stage."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    setup_parallel(pp, tp)
    dp_rank = ps.get_data_parallel_rank()
    batches = masked_batches(m * iters, seed=7 + dp_rank)
    out: dict = {"stage": ps.get_pipeline_model_parallel_rank(), "dp_rank": dp_rank,
                 "tp_rank": ps.get_tensor_model_parallel_rank(),
                 "dp": ps.get_data_parallel_world_size(),
                 "tokens": [int(b["loss_mask"].sum()) for b in batches]}
    kw = dict(tied=tied, dist_opt=dist_opt, per_token_loss=True, tp=tp)

    def train(schedule_of, a=None, drain_each=False):
        _, model, opt = build_tiny_gpt(pp, bf16, **kw)
        popt, fb = opt, None
        if a is not None:
            popt = pm.PACIOptimizer(opt, model)
            fb = pm.PACISchedule(popt, pm.PACIConfig(accumulation=a))
        windows = []
        if popt is not opt:
            update = popt.local_update

            def recording(window):
                ok = update(window)
                windows.append((window.first_microbatch, window.size,
                                int(popt.last_num_tokens)))
                return ok

            popt.local_update = recording
        history = train_steps(model, popt, fb or megatron_schedule(model), iter(batches),
                              iters, m, drain_each=drain_each,
                              forward_step_func=per_token_forward_step)
        if fb is not None:
            fb.drain()
        losses = [[float(x) for x in d["lm loss"]] for o, _ in history for d in o]
        return losses, gpt.model_parameters(model), windows, fb

    out["megatron_losses"], out["megatron_params"], _, _ = train(None)
    out["drained_losses"], out["drained_params"], out["drained_windows"], _ = train(
        None, a=m, drain_each=True)
    losses, _, out["continuous_windows"], fb = train(None, a=m // 2)
    out["continuous_drift"] = fb.telemetry.summary()["max"]
    out["continuous_losses"] = losses
    return out


def start_probe_case(rank, world):
    """How this rank was started: its parent process and the probe's environment variable."""
    import os

    return {"parent": os.getppid(), "probe": os.environ.get("PACI_HARNESS_PROBE")}
