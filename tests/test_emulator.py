"""The pipeline emulator's transport and turn-taking (paci_megatron.emulator): what a rank
computes does not depend on being emulated. Emulated == distributed, bit for bit, on real
runs: tests/test_mitigations.py (Muon, look-ahead, P = 4), tests/test_tied_embeddings.py
(tied, bf16, P = 4), tests/test_recipe.py (the recipe, PACI and 1F1B, uneven splits)."""

import time

import pytest
import torch
import torch.distributed as dist

from harness import DistributedFailure, run_distributed, run_emulated
from paci_megatron import emulator


def _exchange(rank: int, world: int) -> dict:
    """Collectives, a subgroup, a ring of point-to-point messages and each rank's RNG."""
    out = {"rank": dist.get_rank(), "world": dist.get_world_size()}
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    out["sum"] = t.item()
    m = torch.tensor([float(rank)])
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    out["max"] = m.item()
    objects = [None] * world
    dist.all_gather_object(objects, {"rank": rank})
    out["objects"] = objects
    b = torch.tensor([float(rank)])
    dist.broadcast(b, src=world - 1)
    out["broadcast"] = b.item()
    pair = dist.new_group([1, 2])
    if rank in (1, 2):
        p = torch.tensor([10.0 * rank])
        dist.all_reduce(p, group=pair)
        out["pair"] = p.item()
    got = torch.empty(3)
    ops = [dist.P2POp(dist.isend, torch.full((3,), float(rank)), (rank + 1) % world),
           dist.P2POp(dist.irecv, got, (rank - 1) % world)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    out["received"] = got.tolist()
    torch.manual_seed(100 + rank)
    dist.barrier()  # the others run between the seed and the draw
    out["draw"] = torch.rand(4)
    return out


def test_each_rank_sees_what_its_own_process_would():
    emulated = run_emulated(_exchange, 4)
    for rank, out in enumerate(emulated):
        assert (out["rank"], out["world"]) == (rank, 4)
        assert out["sum"] == 10.0 and out["max"] == 3.0 and out["broadcast"] == 3.0
        assert out["objects"] == [{"rank": r} for r in range(4)]
        assert out["received"] == [float((rank - 1) % 4)] * 3
        assert out.get("pair") == (30.0 if rank in (1, 2) else None)
        torch.manual_seed(100 + rank)  # its own RNG stream, untouched by the other ranks
        assert torch.equal(out["draw"], torch.rand(4))
    assert not dist.is_initialized()  # nothing of the ranks' worlds is left here


def _sums(rank: int, world: int, values: torch.Tensor) -> torch.Tensor:
    out = []
    for row in values:
        t = row[rank].clone().reshape(1)
        dist.all_reduce(t)
        out.append(t)
    return torch.cat(out)


@pytest.mark.parametrize("world", [3, 4])
def test_sums_add_in_gloos_order(world):
    """A one-element sum over the ranks rounds exactly as gloo's (the gradient norm of
    Megatron's optimizer is one): values whose sum depends on the order of addition."""
    g = torch.Generator().manual_seed(world)
    values = torch.randn(64, world, generator=g) * torch.logspace(0, 7, world)
    gloo = run_distributed(_sums, world, values, timeout_s=120)[0]
    emulated = run_emulated(_sums, world, values)[0]
    in_rank_order = values.sum(1)
    assert not torch.equal(gloo, in_rank_order)  # the data does tell orders apart
    assert torch.equal(emulated, gloo)


def _waits_forever(rank: int, world: int) -> None:
    if rank == 0:
        dist.recv(torch.empty(1), src=1)  # rank 1 never sends
    dist.barrier()


def test_a_deadlock_stops_every_rank_and_says_what_each_waited_for():
    with pytest.raises(DistributedFailure) as failure:
        run_emulated(_waits_forever, 2)
    text = str(failure.value)
    assert "no rank of the emulated run can go on" in text
    assert "rank 0 waits for a message from rank 1" in text
    assert "rank 1 waits for barrier" in text


def _slow_peer(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(2.0)  # computing while holding the turn, far past the timeout
        dist.send(torch.ones(1), dst=0)
    else:
        dist.recv(torch.empty(1), src=1)


def test_a_wait_past_the_groups_timeout_fails_naming_what_it_waited_for():
    start = time.monotonic()
    with pytest.raises(DistributedFailure) as failure:
        run_emulated(_slow_peer, 2, comm_timeout_s=0.5)
    text = str(failure.value)
    assert "rank 0 failed" in text
    assert "rank 0 timed out after 0.5 s waiting for a message from rank 1" in text
    assert time.monotonic() - start < 30


def _fails_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("stage 1 broke")
    dist.barrier()


def test_a_failing_rank_stops_the_others_with_its_traceback():
    with pytest.raises(DistributedFailure) as failure:
        run_emulated(_fails_on_rank_1, 3)
    text = str(failure.value)
    assert "rank 1 failed" in text and "ValueError: stage 1 broke" in text
    assert "_fails_on_rank_1" in text  # the traceback
    assert run_emulated(lambda rank, world: rank * 2, 3) == [0, 2, 4]  # usable again


def test_outside_an_emulated_run_the_backend_refuses():
    emulator._register_backend()
    with pytest.raises(Exception, match="only available inside"):
        dist.init_process_group(emulator.BACKEND, store=dist.HashStore(), rank=0,
                                world_size=1)
    assert not dist.is_initialized() and emulator.current_rank() is None
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        emulator.run_ranks(0, lambda rank: None)
