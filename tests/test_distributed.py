"""DistributedDataParallel (gloo, 2 processes on this machine) over an optimized module: gradients equal a
single-process step on the whole batch, with weights shared across blocks too."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import invfx
from invfx.examples import RevNetMLP

from conftest import assert_close


def build(shared: bool) -> RevNetMLP:
    torch.manual_seed(0)
    model = RevNetMLP(depth=3, width=8, hidden=8, dropout=0.0).double()
    if shared:
        model.blocks[2].F = model.blocks[0].F  # one sub-network in two blocks
    return model


def worker(rank, world, store, x, shared, path):
    # a file store, not a TCP port: a port picked free can be taken again before the processes bind it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = build(shared)
        ddp = torch.nn.parallel.DistributedDataParallel(invfx.optimize(model, x[:2]))
        ddp(x.chunk(world)[rank]).pow(2).sum().backward()
        if rank == 0:
            torch.save([p.grad * world for p in model.parameters()], path)  # DDP averages over processes
        dist.barrier()  # neither process tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    x = torch.randn(8, 8, dtype=torch.float64)
    for shared in (False, True):
        path = tmp_path / f"grads_{shared}.pt"
        store = tmp_path / f"store_{shared}"
        mp.spawn(worker, args=(2, str(store), x, shared, str(path)), nprocs=2)
        model = build(shared)
        model(x).pow(2).sum().backward()
        assert_close(torch.load(path), [p.grad for p in model.parameters()], rtol=1e-9, atol=1e-11)
