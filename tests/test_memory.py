"""Measured (allocator replay) memory of hand-written invertible chains: flat in depth."""

import torch
import invfx.nn as inn
from invfx.demo import AdditiveCoupling
from invfx.memory import cpu_peak_memory


def step_peak(depth, flags, width=64, batch=128):
    torch.manual_seed(0)
    chain = inn.InvertibleSequential(*[AdditiveCoupling(width, width) for _ in range(depth)])
    x = torch.randn(batch, width)

    def step():
        chain(x).sum().backward()

    with inn.mode(chain, **flags):
        step()  # allocate the .grad tensors first: the measured step then allocates activations only
        for p in chain.parameters():
            p.grad.zero_()
        peak, _ = cpu_peak_memory(step)
    return peak


def test_invertible_chain_peak_is_flat_in_depth():
    activation = 128 * 64 * 4
    flat = {depth: step_peak(depth, {"invertible": True}) for depth in (4, 32)}
    assert flat[32] <= flat[4] * 1.05, flat
    plain = {depth: step_peak(depth, {"checkpoint": False}) for depth in (2, 32)}
    checkpointed = step_peak(32, {"invertible": False})
    # plain keeps two activations per block (F's hidden layer), checkpoint one (the kept input) per block
    assert plain[32] - plain[2] > 30 * 1.5 * activation, plain
    assert checkpointed > flat[32] + 25 * activation, (checkpointed, flat)
