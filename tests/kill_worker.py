"""One rank of a long PACI run, launched by test_reliability.py (not a test itself)."""

import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def main() -> None:
    import torch

    import paci_megatron as pm
    from gpt_recipe import model as gpt
    import datetime

    from paci_megatron.cpu import enable_cpu_mode
    from workers import MBS, SEQ, build_tiny_gpt, setup_parallel, synthetic_batches

    timeout = float(os.environ["PACI_TEST_TIMEOUT"])
    enable_cpu_mode(force=True)
    torch.distributed.init_process_group(backend="gloo",
                                         timeout=datetime.timedelta(seconds=timeout))
    world = torch.distributed.get_world_size()
    setup_parallel(world)
    _, model, opt = build_tiny_gpt(world, bf16=False)
    fb = pm.PACISchedule(pm.PACIOptimizer(opt, model), pm.PACIConfig(p2p_timeout_s=timeout))
    batches = synthetic_batches(world)
    for iteration in range(100000):
        fb(forward_step_func=gpt.forward_step, data_iterator=iter(batches), model=model,
           num_microbatches=world, seq_length=SEQ, micro_batch_size=MBS)
        if iteration == 2:
            print("training", flush=True)


if __name__ == "__main__":
    main()
