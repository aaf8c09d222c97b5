"""DistributedDataParallel and FSDP2 (gloo, 2 processes on this machine) over an optimized module: gradients equal
a single-process step on the whole batch, with weights shared across blocks too. Every multi-process test runs
under ``ranks.run_ranks``: it ends within its deadline whatever a rank does (issue 15)."""

import os
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import assert_close
from ranks import RanksFailed, run_ranks

import invfx
from invfx.examples import RevNetMLP

pytestmark = pytest.mark.slow  # (processes started and joined: seconds each)

try:
    from torch.distributed.fsdp import fully_shard  # FSDP2 (torch >= 2.6)
except ImportError:  # pragma: no cover
    fully_shard = None


#: a collective one process never joins (it failed, or ran other code) fails the test instead of hanging it
TIMEOUT = timedelta(seconds=180)


def build(shared: bool) -> RevNetMLP:
    torch.manual_seed(0)
    model = RevNetMLP(depth=3, width=8, hidden=8, dropout=0.0).double()
    if shared:
        model.blocks[2].F = model.blocks[0].F  # one sub-network in two blocks
    return model


def join(rank, world, store):
    # a file store, not a TCP port: a port picked free can be taken again before the processes bind it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)


def worker(rank, world, store, x, shared, path):
    join(rank, world, store)
    model = build(shared)
    ddp = torch.nn.parallel.DistributedDataParallel(invfx.optimize(model, x[:2]))
    ddp(x.chunk(world)[rank]).pow(2).sum().backward()
    if rank == 0:
        torch.save([p.grad * world for p in model.parameters()], path)  # DDP averages over processes
    dist.barrier()  # neither process leaves while the other still talks to it
    return ddp  # (held to the end: run_ranks ends the process without tearing gloo down)


def test_ddp_gloo_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    x = torch.randn(8, 8, dtype=torch.float64)
    for shared in (False, True):
        path = tmp_path / f"grads_{shared}.pt"
        store = tmp_path / f"store_{shared}"
        run_ranks(worker, 2, (str(store), x, shared, str(path)))
        model = build(shared)
        model(x).pow(2).sum().backward()
        assert_close(torch.load(path), [p.grad for p in model.parameters()], rtol=1e-9, atol=1e-11)


def fsdp_worker(rank, world, store, x, path):
    """FSDP2 (fully_shard) on CPU over gloo: the optimized module sharded as a whole; modules inside its regions
    sharded one by one (those regions then run as plain code: FSDP's hooks see inside them); and a model sharded
    before optimize (refused)."""
    join(rank, world, store)
    results = {}
    mine = x.chunk(world)[rank]

    model = build(False)
    optimized = invfx.optimize(model, x[:2])
    results["modes"] = sorted({str(row["mode"]) for row in optimized.plan.rows})
    fully_shard(optimized)
    optimized(mine).pow(2).sum().backward()
    results["whole"] = [p.grad.full_tensor() for p in model.parameters()]  # (FSDP averages over processes)

    model = build(False)
    optimized = invfx.optimize(model, x[:2])
    inner = [m for block in model.blocks for m in (*block.F, *block.G) if any(True for _ in m.parameters())]
    for module in inner:
        fully_shard(module)
    fully_shard(optimized)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized(mine).pow(2).sum().backward()
    results["inner"] = [p.grad.full_tensor() for p in model.parameters()]
    results["inner_warnings"] = [str(w.message) for w in caught if "runs as plain code" in str(w.message)]

    model = build(False)
    for block in model.blocks:
        fully_shard(block)
    try:
        invfx.optimize(model, x[:2])
        results["sharded_first"] = "no error"
    except invfx.InvfxError as error:
        results["sharded_first"] = str(error)
    if rank == 0:
        torch.save(results, path)
    dist.barrier()
    return optimized


@pytest.mark.skipif(fully_shard is None or not dist.is_gloo_available(), reason="needs FSDP2 and gloo")
def test_fsdp2_fully_shard_gloo_two_processes_match_one_process(tmp_path):
    x = torch.randn(8, 8, dtype=torch.float64)
    path = tmp_path / "fsdp.pt"
    run_ranks(fsdp_worker, 2, (str(tmp_path / "store"), x, str(path)))
    results = torch.load(path)
    model = build(False)
    model(x).pow(2).sum().backward()
    expected = [p.grad * 0.5 for p in model.parameters()]  # FSDP averages the two processes' gradients
    assert "invertible" in results["modes"]
    assert_close(results["whole"], expected, rtol=1e-9, atol=1e-11)
    assert_close(results["inner"], expected, rtol=1e-9, atol=1e-11)
    assert results["inner_warnings"] and "FSDPLinear" in results["inner_warnings"][0]
    assert "already wrapped by fully_shard" in results["sharded_first"] and "blocks.0" in results["sharded_first"]


# -- the watchdog itself ----------------------------------------------------------------------------------------


def one_rank_exits_at_once(rank, world, store):
    if rank == 1:
        os._exit(3)
    join(rank, world, store)  # waits for rank 1 at the rendezvous (for TIMEOUT, were it not for the watchdog)


def one_rank_raises(rank, world, store):
    join(rank, world, store)
    if rank == 0:
        raise ValueError("rank 0 gave up")
    dist.barrier()  # never answered


def one_rank_hangs(rank, world):
    if rank == 0:
        time.sleep(3600)


def test_a_rank_that_exits_at_once_fails_the_test_quickly(tmp_path):
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"rank 1 exited with code 3 \(after .* s; killed rank 0\)"):
        run_ranks(one_rank_exits_at_once, 2, (str(tmp_path / "store"),))
    assert time.monotonic() - start < 60


def test_a_rank_that_raises_is_reported_with_its_traceback(tmp_path):
    with pytest.raises(RanksFailed, match=r"(?s)rank 0 raised:.*ValueError: rank 0 gave up"):
        run_ranks(one_rank_raises, 2, (str(tmp_path / "store"),))


def test_a_rank_that_hangs_is_killed_at_the_deadline_and_shown_where_it_was():
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"(?s)rank 0 still running after 10 s \(killed\); rank 0 was at:.*"
                                          r"one_rank_hangs"):
        run_ranks(one_rank_hangs, 2, timeout=10)
    assert time.monotonic() - start < 30
