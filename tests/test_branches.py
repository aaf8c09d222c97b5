"""Branch records (issue 17, item 4): a sub-network recomputed on rebuilt inputs takes the forward's relu masks,
clamp ranges, abs signs and max-pool argmaxes, so that its gradients are plain autograd's even where rounding in
the rebuild moved a value across a threshold. Against plain autograd in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import invfx
from invfx.errors import RegionError
from invfx.modes import Mode
from invfx.runtime import branches, invertible_checkpoint, rng_mark
from invfx.runtime.branches import BranchRecord, pack_bits, recording, replaying, unpack_bits

DT = torch.float64


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (64, 33)])
def test_bits_round_trip(shape):
    torch.manual_seed(0)
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
    strided = torch.rand(6, 10) > 0.5
    assert torch.equal(unpack_bits(pack_bits(strided.t()), strided.t().shape), strided.t())


def bits_by_definition(mask: torch.Tensor) -> torch.Tensor:
    """Byte j holds elements 8j..8j+7 of the flattened mask, element 8j+k as bit k."""
    flat = mask.reshape(-1).tolist()
    flat += [False] * (-len(flat) % 8)
    return torch.tensor([sum(1 << k for k in range(8) if flat[8 * j + k]) for j in range(len(flat) // 8)],
                        dtype=torch.uint8)


@pytest.mark.parametrize("little_endian", [True, False])
def test_bits_are_packed_eight_to_a_byte_in_either_code_path(monkeypatch, little_endian):
    monkeypatch.setattr(branches, "_LITTLE_ENDIAN", little_endian)
    torch.manual_seed(1)
    base = torch.rand(1001) > 0.3
    cases = {"random": base, "all set": torch.ones(64, dtype=torch.bool), "none set": torch.zeros(9, dtype=torch.bool),
             "empty": torch.zeros(0, dtype=torch.bool), "view at an odd offset": base[3:700],
             "transposed": (torch.rand(9, 13) > 0.5).t()}
    for what, mask in cases.items():
        packed = pack_bits(mask)
        assert torch.equal(packed, bits_by_definition(mask)), what
        assert torch.equal(unpack_bits(packed, mask.shape), mask), what


# -- each op: recorded on x, replayed on x moved across its thresholds: the replay's value is the original's up to
# the move, its gradient exactly the original's at x


def _ops():
    return {
        "relu": (lambda x: torch.relu(x), 0.0),
        "F.relu": (lambda x: F.relu(x), 0.0),
        "nn.ReLU": (nn.ReLU(), 0.0),
        "Tensor.relu": (lambda x: x.relu(), 0.0),
        "relu in place": (lambda x: F.relu(x * 1, inplace=True), 0.0),
        "nn.ReLU in place": (lambda x: nn.ReLU(inplace=True)(x * 1), 0.0),
        "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), 0.0),
        "hardtanh": (lambda x: F.hardtanh(x, -0.5, 0.5), 0.5),
        "relu6": (lambda x: nn.ReLU6()(x * 8), 6 / 8),
        "clamp": (lambda x: x.clamp(-0.5, 0.5), 0.5),
        "torch.clamp min": (lambda x: torch.clamp(x, min=0.25), 0.25),
        "clamp_max": (lambda x: x.clamp_max(-0.25), -0.25),
        "abs": (lambda x: x.abs(), 0.0),
        "torch.abs": (lambda x: torch.abs(x), 0.0),
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_replay_takes_the_forward_branches(name):
    op, threshold = _ops()[name]
    torch.manual_seed(0)
    x = torch.randn(4, 50, dtype=DT)
    x[0, :10] = threshold  # at the threshold exactly
    x[1, :10] = threshold + torch.linspace(-1e-9, 1e-9, 10, dtype=DT)  # within rounding of it
    moved = x + 1e-8 * torch.randn_like(x)  # "rebuilt": crosses the threshold at some of them
    grad_out = torch.randn(4, 50, dtype=DT)

    leaf = x.clone().requires_grad_()
    expected = op(leaf)
    expected.backward(grad_out)

    record = BranchRecord("test")
    with torch.no_grad(), recording(record):
        rng_mark("sub-network")
        op(x)
    assert record, "nothing was recorded"
    rebuilt = moved.clone().requires_grad_()
    with replaying(record):
        rng_mark("sub-network")
        got = op(rebuilt)
    got.backward(grad_out)
    assert_close(got, expected, rtol=0, atol=1e-6, what="value")  # (moved by 1e-8 x up to 8, x 4 sigma)
    assert_close(rebuilt.grad, leaf.grad, rtol=0, atol=0, what="gradient")

    # the same on the moved input without the record: the branches differ (the test can fail)
    plain = moved.clone().requires_grad_()
    op(plain).backward(grad_out)
    assert not torch.equal(plain.grad, leaf.grad)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=2, stride=1, dilation=2), dict(kernel_size=3, ceil_mode=True),
                                    dict(kernel_size=2, return_indices=True)])
def test_max_pool_replays_the_argmax(kwargs):
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 3, 9, 9, dtype=DT)).round()  # many ties: which is the argmax is up to rounding
    moved = x + 1e-9 * torch.randn_like(x)
    leaf = x.clone().requires_grad_()
    expected = F.max_pool2d(leaf, **kwargs)
    first = expected[0] if isinstance(expected, tuple) else expected
    grad_out = torch.randn_like(first)
    first.backward(grad_out)

    record = BranchRecord("test")
    with torch.no_grad(), recording(record):
        rng_mark("pool")
        nn.MaxPool2d(**kwargs)(x) if "return_indices" not in kwargs else F.max_pool2d(x, **kwargs)
    assert record.nbytes == first.numel()  # one byte an output
    rebuilt = moved.clone().requires_grad_()
    with replaying(record):
        rng_mark("pool")
        got = F.max_pool2d(rebuilt, **kwargs)
    if isinstance(got, tuple):
        assert torch.equal(got[1], expected[1])
        got = got[0]
    got.backward(grad_out)
    assert_close(got, first, rtol=0, atol=1e-8, what="value")
    assert_close(rebuilt.grad, leaf.grad, rtol=0, atol=0, what="gradient")
    plain = moved.clone().requires_grad_()
    pooled = F.max_pool2d(plain, **kwargs)
    (pooled[0] if isinstance(pooled, tuple) else pooled).backward(grad_out)
    assert not torch.equal(plain.grad, leaf.grad)  # (the ties went the other way somewhere)


def test_sparse_masks_keep_only_the_elements_near_the_threshold():
    torch.manual_seed(0)
    x = torch.randn(64, 256)  # float32: the margin is 1e-3 of the largest |x|
    record = BranchRecord("test")
    with recording(record):
        rng_mark("net")
        torch.relu(x)
    dense = -(-x.numel() // 8)
    assert 0 < record.nbytes < dense / 4
    indices = record.scopes["net"][0][2][0]
    assert bool((x.reshape(-1)[indices.long()].abs() <= 1e-3 * x.abs().max()).all())
    # a rebuild drifting beyond the margin is said, not silently taken
    drifted = x + 1e-2 * x.abs().max() * torch.randn_like(x)
    with replaying(record), pytest.warns(RuntimeWarning, match="moved by more than"):
        rng_mark("net")
        torch.relu(drifted)


def test_nothing_is_recorded_outside_marks_or_regions():
    x = torch.randn(10)
    record = BranchRecord("test")
    with recording(record):
        torch.relu(x)  # no mark: no scope
    assert not record
    rng_mark("outside a region")  # does nothing
    assert torch.equal(torch.relu(x), x.clamp_min(0))


def test_a_rebuild_running_other_ops_is_refused():
    x = torch.randn(10)
    record = BranchRecord("region")
    with recording(record):
        rng_mark("net")
        torch.relu(x)
    with replaying(record), pytest.raises(RegionError, match="ran abs on .* where the forward ran relu"):
        rng_mark("net")
        torch.abs(x)


def test_a_mark_used_twice_in_one_forward_is_refused():
    record = BranchRecord("region")
    with recording(record), pytest.raises(RegionError, match="used twice"):
        rng_mark("net")
        rng_mark("net")


# -- in regions: a relu whose input the rebuild moves across 0


class Step(nn.Module):
    """``a = x * scale + shift`` (an inverse that rounds), then ``y1 = a1 + lin(relu(a2 - c))`` with ``c`` equal to
    ``a2`` at the example: its relu's input is exactly 0 in forward, and off by rounding when ``a2`` is rebuilt
    (by the next step's inverse), where plain autograd's mask says 0 and the rebuilt one says 1 at random."""

    def __init__(self, width, c):
        super().__init__()
        self.lin = nn.Linear(width // 2, width // 2).to(DT)
        self.register_buffer("c", c)

    def forward(self, x):
        a = x * 3.0 + 0.1  # (constants: a parameter's product would keep x for its gradient: nothing rebuilt)
        a1, a2 = a.chunk(2, dim=1)
        return torch.cat([a1 + self.lin(torch.relu(a2 - self.c)), a2], dim=1)


def _stack(x, depth=3):
    torch.manual_seed(1)
    steps, h = [], x
    for _ in range(depth):
        with torch.no_grad():
            a2 = (h * 3.0 + 0.1).chunk(2, dim=1)[1]
            step = Step(x.shape[1], a2.clone())
            h = step(h)
        steps.append(step)
    return nn.Sequential(*steps)


def _grads(model, x):
    model.zero_grad()
    leaf = x.clone().requires_grad_()
    (model(leaf) ** 2).sum().backward()
    return [leaf.grad] + [p.grad for p in model.parameters()]


def test_optimized_flow_takes_the_forward_masks(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=DT)
    model = _stack(x)
    expected = _grads(copy.deepcopy(model), x)

    optimized = invfx.optimize(model, x, modes=("invertible",))
    rows = [row for row in optimized.plan.rows if row.mode == Mode.INVERTIBLE]
    assert rows and any(row.branch_ops.get("relu") for row in rows), optimized.plan
    assert all(row.branch_bytes <= row.kept_bytes for row in rows)
    assert "relu" in str(optimized.plan)
    for got, want in zip(_grads(optimized, x), expected):
        assert_close(got, want, rtol=1e-10, atol=1e-12)

    # the same plan without the records: the rebuilt masks differ (what the records are for)
    monkeypatch.setattr(branches, "_HANDLERS", {})
    errors = [float((g - w).abs().max() / w.abs().max()) for g, w in zip(_grads(optimized, x), expected)]
    assert max(errors) > 1e-3


def test_hand_written_region_takes_the_forward_masks(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).to(DT)
    x1, x2 = torch.randn(32, 8, dtype=DT), torch.randn(32, 8, dtype=DT)
    c = x2.clone()

    def function(x1, x2):
        rng_mark("F")
        return x1 + lin(torch.relu(x2 - c)), x2 * 1  # (a copy: an output that is its input frees nothing)

    def inverse(y1, y2):
        y2 = y2 + 1e-12 * torch.randn_like(y2)  # a rebuild that rounds
        rng_mark("F")
        return y1 - lin(torch.relu(y2 - c)), y2

    def run(record):
        lin.zero_grad()
        a, b = x1.clone().requires_grad_(), (x2 * 1).requires_grad_()
        if record is None:
            y1, y2 = function(a, b)
        else:
            torch.manual_seed(2)
            y1, y2 = invertible_checkpoint(function, inverse, a * 1, b * 1, free=True)
        (y1 ** 2).sum().backward()
        return [a.grad, b.grad, lin.weight.grad, lin.bias.grad]

    expected = run(None)
    for got, want in zip(run(True), expected):
        assert_close(got, want, rtol=1e-9, atol=1e-10)
    monkeypatch.setattr(branches, "_HANDLERS", {})  # without the records: x2's gradient goes through flipped masks
    assert not torch.allclose(run(True)[1], expected[1], rtol=1e-3, atol=1e-3)


class CouplingThenLeaky(nn.Module):
    """A recomputed relu and an inverted leaky_relu of the same shape in one region: the leaky_relu must not be
    recorded in, or replayed from, the relu's sub-network (it was: a 0.99 relative gradient error)."""

    def __init__(self, width):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).to(DT)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = F.leaky_relu(x1 + self.f(x2), 0.3)
        return torch.cat([x2, y1], dim=1)


def test_an_inverted_op_after_a_recomputed_one_is_no_part_of_its_record():
    torch.manual_seed(0)
    model = nn.Sequential(*[CouplingThenLeaky(8) for _ in range(3)])
    x = torch.randn(16, 16, dtype=DT)
    expected = _grads(copy.deepcopy(model), x)
    optimized = invfx.optimize(model, x, modes=("invertible",))
    assert sum(row.mode == Mode.INVERTIBLE for row in optimized.plan.rows) >= 2
    for got, want in zip(_grads(optimized, x), expected):
        assert_close(got, want, rtol=1e-10, atol=1e-12)
    # (the leaky_relu runs after the relu's sub-network is closed: only relus are recorded)
    rows = [row for row in optimized.plan.rows if row.mode == Mode.INVERTIBLE]
    assert all(set(row.branch_ops) <= {"relu"} for row in rows) and any(row.branch_ops for row in rows), \
        [row.branch_ops for row in rows]
    assert any("self.end_" in m.forward_body.code for m in optimized.modules() if hasattr(m, "forward_body"))


def test_exact_branches_false_records_nothing():
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=DT)
    model = _stack(x)
    expected = _grads(copy.deepcopy(model), x)
    optimized = invfx.optimize(model, x, modes=("invertible",), check_gradients=False,
                               options=invfx.OptimizeOptions(exact_branches=False))
    rows = [row for row in optimized.plan.rows if row.mode == Mode.INVERTIBLE]
    assert rows and not any(row.branch_bytes or row.branch_ops for row in rows)
    errors = [float((g - w).abs().max() / w.abs().max()) for g, w in zip(_grads(optimized, x), expected)]
    assert max(errors) > 1e-3  # (the masks flipped: what the option trades for time)
