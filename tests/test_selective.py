"""Selective checkpointing (issue 17, first part): a checkpoint that keeps its convolutions' and matrix products'
outputs and recomputes only the cheap ops between them; against plain autograd in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import CountOps, assert_close, saved_and_loaded
from torch import nn

import invfx
from invfx.errors import RegionError
from invfx.examples import ResNet, Transformer
from invfx.measure import measure
from invfx.modes import Mode
from invfx.runtime import Region, run_region
from invfx.runtime.stash import EXPENSIVE_OPS, OutputStash

DT = torch.float64


def block():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).to(DT)


def step(function, x, params, seed=1, retain=False):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    out = function(x)
    loss = (out.pow(2).mean() + out.sum())
    loss.backward(retain_graph=retain)
    if retain:
        loss.backward()
    return out.detach(), x.grad, [p.grad for p in params]


def run_selective(function, x, params, buffers):
    """One step of ``function`` as a selective region, and how many times each op ran."""
    region = Region(function, keep_ops=EXPENSIVE_OPS, buffers=buffers, name="selective")
    counting = CountOps()
    with counting:
        got = step(lambda t: run_region(region, (t,)), x, params)
    return got, counting.counts


def test_a_selective_region_trains_as_plain_autograd_running_each_convolution_once():
    torch.manual_seed(0)
    model, x = block(), torch.randn(4, 3, 8, 8, dtype=DT)
    twin = copy.deepcopy(model)
    expected = step(twin, x, list(twin.parameters()))
    got, counts = run_selective(model, x, list(model.parameters()), (model,))
    assert_close(got, expected)
    # forward and backward: each convolution ran once, in forward (a checkpoint runs it again in backward)
    assert counts[torch.ops.aten.convolution] == 2
    assert counts[torch.ops.aten.native_batch_norm] + \
        counts.get(torch.ops.aten._native_batch_norm_legit, 0) >= 4  # (BatchNorm recomputed: cheap)
    for mine, theirs in zip(model.buffers(), twin.buffers()):  # BatchNorm statistics updated once
        assert torch.equal(mine, theirs)


def test_a_second_backward_recomputes_everything():
    torch.manual_seed(0)
    model, x = block(), torch.randn(2, 3, 8, 8, dtype=DT)
    twin = copy.deepcopy(model)
    expected = step(twin, x, list(twin.parameters()), retain=True)
    region = Region(model, keep_ops=EXPENSIVE_OPS, buffers=(model,), name="block")
    got = step(lambda t: run_region(region, (t,)), x, list(model.parameters()), retain=True)
    assert_close(got, expected)


def test_a_kept_output_written_in_place_later_is_recomputed_not_used():
    """An in-place write the graph does not show (inside a function or a leaf module) changes a kept output:
    the recomputation runs that convolution again rather than read the changed value."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)

    def function(t):
        y = conv(t)
        y.mul_(2.0)  # (writes into the convolution's output after the stash kept it)
        return torch.tanh(y)

    x = torch.randn(2, 3, 6, 6, dtype=DT)
    expected = step(function, x, list(conv.parameters()))
    got, counts = run_selective(function, x, list(conv.parameters()), (conv,))
    assert_close(got, expected)
    assert counts[torch.ops.aten.convolution] == 2  # (recomputed: its kept output was changed)


def test_the_stash_forgets_what_the_region_hands_on():
    """A region's output may be freed by the next (invertible) region: the stash must not hand it back."""
    stash = OutputStash(EXPENSIVE_OPS)
    w = torch.randn(4, 4, dtype=DT)
    with stash.recording():
        inner = torch.mm(torch.randn(3, 4, dtype=DT), w)
        out = torch.mm(inner, w)
    assert stash.nbytes == 2 * 3 * 4 * 8
    stash.drop([out])
    assert stash.nbytes == 3 * 4 * 8


def test_keep_ops_is_for_checkpoint_regions():
    with pytest.raises(RegionError, match="keep_ops is for checkpoint regions"):
        Region(torch.relu, mode="invertible", inverse=lambda outputs, saved: outputs, keep_ops=EXPENSIVE_OPS)


def op_counts(module, x, model):
    """How many times each op runs in one training step of ``module`` (``model``'s parameters)."""
    counting = CountOps()
    with counting:
        step(module, x, list(model.parameters()))
    return counting.counts


def compare(model, x, optimized):
    got = step(optimized, x, list(model.parameters()))
    expected = step(model, x, list(model.parameters()))
    assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_optimize_plans_selective_segments_with_plain_gradients():
    """With room (a budget of 1 TiB, selective the only mode besides keep), every convolution's output
    is kept: the recomputation runs none of them again."""
    torch.manual_seed(0)
    model, x = ResNet(depth=4, channels=8).to(DT), torch.randn(4, 3, 16, 16, dtype=DT)
    optimized = invfx.optimize(model, x, modes=("selective",), memory_budget=2 ** 40)
    rows = [r for r in optimized.plan.rows if r.mode != Mode.KEEP]
    assert rows and all(r.mode == Mode.SELECTIVE and r.name.startswith("sac_") for r in rows)
    assert all(r.why.startswith("keeps its input and the outputs of ") for r in rows)
    assert all(len(r.kept_ops) == 2 and all("conv" in n for n in r.kept_ops) for r in rows if "blocks" in r.name)
    assert all({"bn1", "bn2"} <= {n.split("_")[-1] for n in r.recomputed_ops} for r in rows if "blocks" in r.name)
    assert optimized.plan.to_dict()["segments"][1]["kept_ops"] == ["blocks_0_conv1", "blocks_0_conv2"]
    compare(model, x, optimized)
    # (a checkpointed block runs its convolutions twice; a selective one, once)
    convolution = torch.ops.aten.convolution
    assert op_counts(optimized, x, model)[convolution] == op_counts(model, x, model)[convolution]


def test_least_memory_keeps_only_some_calls_and_runs_the_others_again():
    """Per call: with no budget (least peak) a block keeps the output of fewer convolutions than it has; those
    it does not keep run again in backward, and the gradients are plain autograd's."""
    torch.manual_seed(0)
    model, x = ResNet(depth=4, channels=8).to(DT), torch.randn(4, 3, 16, 16, dtype=DT)
    optimized = invfx.optimize(model, x, modes=("keep", "selective"))
    rows = [r for r in optimized.plan.rows if r.mode == Mode.SELECTIVE]
    blocks = [r for r in rows if "blocks" in r.name]
    assert blocks and any(len(r.kept_ops) == 1 for r in blocks)
    for row in rows:  # (what the region keeps is what the plan says it keeps)
        region = optimized.get_submodule(row.region)
        assert region.kept_calls == frozenset(row.kept_ops)
    compare(model, x, optimized)
    convolution = torch.ops.aten.convolution
    recomputed = sum(1 for r in rows for n in r.recomputed_ops if "conv" in n or n == "stem_0")
    assert recomputed > 0
    assert op_counts(optimized, x, model)[convolution] == op_counts(model, x, model)[convolution] + recomputed


def test_selective_memory_lies_between_checkpoint_and_plain():
    """Measured (exact CPU peak of one training step), not estimated."""
    torch.manual_seed(0)
    model, x = ResNet(depth=6, channels=16), torch.randn(8, 3, 16, 16)
    peaks = {}
    for modes in (("keep",), ("keep", "selective"), ("keep", "checkpoint")):
        optimized = invfx.optimize(model, x, modes=modes, check_gradients=False)
        peaks[modes[-1]] = measure(optimized, x, steps=1).peak_bytes
    assert peaks["checkpoint"] < peaks["selective"] < peaks["keep"], peaks


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_selective_matrix_products_and_attention_in_a_transformer(dropout):
    """Linear layers on 3-D inputs and attention go through views of mm and the attention kernel; dropout's
    masks are drawn again in the recomputation from the forward's RNG state."""
    torch.manual_seed(0)
    model = Transformer(features=8, dim=16, depth=3, heads=2, hidden=32, dropout=dropout).to(DT)
    x = torch.randn(2, 5, 8, dtype=DT)
    optimized = invfx.optimize(model, x, modes=("selective",), memory_budget=2 ** 40)  # (room to keep every call)
    assert sum(r.mode == Mode.SELECTIVE for r in optimized.plan.rows) >= 2, str(optimized.plan)
    compare(model, x, optimized)
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert op_counts(optimized, x, model)[attention] == op_counts(model, x, model)[attention]


def test_a_user_function_with_a_hidden_in_place_write_is_not_planned_selective():
    """Measured: the stash of a segment whose kept output is written in place would save nothing sure."""

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, t):
            y = self.conv(t)
            return F.relu_(y) if not torch.fx._symbolic_trace.is_fx_tracing() else F.relu(y)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Hidden() for _ in range(3)])

        def forward(self, t):
            for b in self.blocks:
                t = b(t) + t
            return t

    torch.manual_seed(0)
    model, x = Net().to(DT), torch.randn(2, 4, 6, 6, dtype=DT)
    optimized = invfx.optimize(model, x, modes=("keep", "selective"), leaf_modules=[Hidden])
    assert not any(r.mode == Mode.SELECTIVE for r in optimized.plan.rows)
    compare(model, x, optimized)


def test_the_stash_mode_runs_only_around_the_calls_it_keeps():
    """A selective region's dispatch mode is on around its convolutions only: the cheap ops between them run
    without it (around the whole body it cost about as much as recomputing them)."""
    from invfx.runtime import stash as stash_module

    torch.manual_seed(0)
    model, x = ResNet(depth=2, channels=8).to(DT), torch.randn(2, 3, 8, 8, dtype=DT)
    optimized = invfx.optimize(model, x, modes=("keep", "selective"), check_gradients=False)
    region = next(m for n, m in optimized.named_children() if n.startswith("sac_"))
    assert "stash_begin()" in region._body(region.kept_calls)[0].code and "stash_begin" not in region.code
    seen = []
    original = stash_module._Recording.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func.overloadpacket)
        return original(self, func, types, args, kwargs)

    stash_module._Recording.__torch_dispatch__ = spy
    try:
        optimized(x).sum().backward()
    finally:
        stash_module._Recording.__torch_dispatch__ = original
    assert seen and set(seen) == {torch.ops.aten.convolution}


@pytest.mark.parametrize("kind", ["resnet", "transformer"])
def test_selective_regions_under_bf16_autocast_give_plain_gradients(kind):
    """The forward's autocast state is replayed in the recomputation: the kept outputs (bfloat16) and the
    recomputed ops' inputs match what they were, and the gradients are plain autocast's exactly."""
    torch.manual_seed(0)
    if kind == "resnet":
        model, x = ResNet(depth=3, channels=8), torch.randn(4, 3, 16, 16)
    else:
        model, x = Transformer(features=8, dim=16, depth=3, heads=2, hidden=32, dropout=0.1), torch.randn(2, 5, 8)
    optimized = invfx.optimize(model, x, modes=("keep", "selective"), check_gradients=False)
    assert any(r.mode == Mode.SELECTIVE for r in optimized.plan.rows)
    grads = []
    for module in (model, optimized):
        torch.manual_seed(3)
        for p in model.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        out.float().square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for mine, plain in zip(*grads):
        assert torch.equal(mine, plain)


def test_a_selective_module_saved_and_loaded_trains_as_before():
    """torch.save / torch.load: the marked body is made again on load (it is never pickled)."""

    torch.manual_seed(0)
    model, x = ResNet(depth=3, channels=8).to(DT), torch.randn(2, 3, 8, 8, dtype=DT)
    optimized = invfx.optimize(model, x, modes=("keep", "selective"), check_gradients=False)
    optimized(x).sum().backward()  # (the marked body and the runtime's caches exist before saving)
    loaded = saved_and_loaded(optimized)
    assert any(name.startswith("sac_") for name, _ in loaded.named_children())
    got = step(loaded, x, list(loaded.parameters()))
    expected = step(model, x, list(model.parameters()))
    assert_close(got, expected, rtol=1e-9, atol=1e-11)
