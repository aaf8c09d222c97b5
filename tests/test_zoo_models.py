"""Models from other libraries (issue 18): timm, torchvision and Hugging Face transformers, built small with
random weights, optimized at budget None and 0.5: outputs and every gradient equal plain autograd's, budgets
measured, BatchNorm statistics updated once, dropout replayed, and what cannot be traced named in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, model_library
from torch import nn

import invfx
from invfx.memory import cpu_peak_memory


def _step(module, inputs: dict | tuple, seed: int = 0):
    """Outputs and every parameter gradient of one training step (loss: the outputs weighed by fixed random
    numbers), under ``seed``."""
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = module(**inputs) if isinstance(inputs, dict) else module(*inputs)
    tensors = [t for t in (out.values() if isinstance(out, dict) else [out]) if isinstance(t, torch.Tensor)
               and t.requires_grad]
    weights = torch.Generator().manual_seed(1)
    sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum() for t in tensors).backward()
    return [t.detach() for t in tensors], [p.grad for p in module.parameters()]


def _assert_trains_as_plain(model: nn.Module, inputs, budget, seed: int = 0) -> invfx.OptimizedModule:
    optimized = invfx.optimize(model, inputs, memory_budget=budget)
    plain_twin = copy.deepcopy(model)
    expected = _step(plain_twin, inputs, seed)
    got = _step(optimized, inputs, seed)
    assert_close(got[0], expected[0], what="outputs")
    assert_close(got[1], expected[1], what="parameter gradients")
    return optimized


def _segments(optimized) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in optimized.plan.rows:
        counts[str(row.mode)] = counts.get(str(row.mode), 0) + 1
    return counts


# --- timm and torchvision ------------------------------------------------------------------------------------

def _timm(name, **kwargs):
    return model_library("timm").create_model(name, num_classes=10, **kwargs)


VISION = {
    "timm resnet18": lambda: _timm("resnet18"),
    "timm convnext_atto": lambda: _timm("convnext_atto"),
    "timm vit (tiny, 8x8 patches)": lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4),
    "timm mobilenetv3_small_050": lambda: _timm("mobilenetv3_small_050"),
    "torchvision resnet18": lambda: model_library("torchvision").models.resnet18(num_classes=10),
    "torchvision mobilenet_v3_small": lambda: model_library("torchvision").models.mobilenet_v3_small(num_classes=10),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "convnext" in n else n
                                  for n in sorted(VISION)])
def test_vision_models_train_as_plain_at_least_memory(name):
    torch.manual_seed(0)
    model = VISION[name]().double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    optimized = _assert_trains_as_plain(model, (x,), None)
    assert not optimized.plan.opaque, optimized.plan.opaque  # (traced through, nothing kept whole)
    assert set(_segments(optimized)) - {"keep"}, "nothing planned to save memory"


@pytest.mark.slow
def test_vit_meets_half_the_plain_peak_with_the_gradients_of_plain():
    torch.manual_seed(0)
    model = VISION["timm vit (tiny, 8x8 patches)"]().double().train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    optimized = _assert_trains_as_plain(model, (x,), 0.5)
    calibration = optimized.plan.calibration
    assert calibration["peak_bytes"] <= 0.5 * calibration["plain_bytes"]


@pytest.mark.slow
def test_resnet18_meets_a_budget_it_can_reach_measured():
    """resnet18's least peak is ~0.77 of plain (its stem's backward holds four full-resolution tensors: budget 0.5
    is a BudgetError, benchmarks/zoo.py); 0.8 is met, measured on the example, at a size where activations, not
    a CPU convolution backward's weight-sized workspace, make the peak (measured 0.799), with the float64 gradient
    check passed."""
    torch.manual_seed(0)
    model = VISION["torchvision resnet18"]().train()
    x = torch.randn(16, 3, 112, 112)
    optimized = invfx.optimize(model, x, memory_budget=0.8)
    calibration = optimized.plan.calibration
    assert calibration["peak_bytes"] <= 0.8 * calibration["plain_bytes"], calibration
    assert "matches plain autograd" in str(optimized.plan.gradient_check)
    with pytest.raises(invfx.BudgetError, match="cannot be met"):
        invfx.optimize(model, x, memory_budget=0.5, check_gradients=False)


@pytest.mark.parametrize("name", ["torchvision resnet18", "timm mobilenetv3_small_050"])
def test_batchnorm_statistics_update_once_per_step(name):
    """torchvision's BatchNorm2d is a module the regions call; timm's BatchNormAct2d is traced through (its
    F.batch_norm updated the running statistics a second time in a recomputation)."""
    torch.manual_seed(0)
    model = VISION[name]().double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    optimized = invfx.optimize(model, x)
    assert set(_segments(optimized)) - {"keep"}
    plain = copy.deepcopy(model)
    _step(plain, (x,))
    _step(optimized, (x,))
    for (name, a), b in zip(model.named_buffers(), plain.buffers()):
        assert_close(a, b, what=name)


# --- Hugging Face transformers ----------------------------------------------------------------------------------

def _gpt2(dropout: float = 0.0):
    transformers = model_library("transformers")
    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                     use_cache=False, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config)


def _bert():
    transformers = model_library("transformers")
    config = transformers.BertConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config)


def _text(batch: int = 4, length: int = 16) -> dict:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2:] = 0  # (a padded sequence: the mask is an input the graph reads)
    return {"input_ids": torch.randint(0, 128, (batch, length), generator=generator), "attention_mask": mask}


@pytest.mark.parametrize("budget", [None, 0.5])
@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_hugging_face_blocks_are_planned_and_train_as_plain(build, budget):
    torch.manual_seed(0)
    model = build().double().train()
    inputs = _text()
    optimized = _assert_trains_as_plain(model, inputs, budget)
    out = optimized(**inputs)
    assert type(out) is type(model(**inputs))  # (the model's ModelOutput class)
    planned = [row for row in optimized.plan.rows if str(row.mode) != "keep"]
    assert len(planned) >= 3, optimized.plan  # (several blocks, not one opaque leaf)
    if budget is not None:
        calibration = optimized.plan.calibration
        assert calibration["peak_bytes"] <= budget * calibration["plain_bytes"]


@pytest.mark.slow
def test_gpt2_measured_peak_within_half_of_plain():
    torch.manual_seed(0)
    model = _gpt2().double().train()
    inputs = _text(8, 32)
    optimized = invfx.optimize(model, inputs, memory_budget=0.5)

    def peak(module):
        def step():
            module(**inputs).logits.sum().backward()
        step()  # (allocates .grad: the measured step then allocates activations and temporaries only)
        for p in model.parameters():
            p.grad.zero_()
        return cpu_peak_memory(step)[0]

    assert peak(optimized) <= 0.5 * peak(model)


@pytest.mark.slow
def test_gpt2_with_dropout_replays_its_masks():
    torch.manual_seed(0)
    model = _gpt2(dropout=0.2).double().train()
    inputs = _text()
    optimized = _assert_trains_as_plain(model, inputs, 0.5, seed=7)
    assert set(_segments(optimized)) - {"keep"}
    # the exported graph's aten.dropout calls keep their masks where recomputed (drawn once per step)
    assert any(row.mask_bytes for row in optimized.plan.rows), str(optimized.plan)
    got, expected = _step(optimized, inputs, seed=8)[0], _step(model, inputs, seed=9)[0]
    assert not torch.equal(got[0], expected[0])  # (the masks do depend on the seed: the test above can fail)


def test_hugging_face_model_called_at_another_shape_is_named():
    model = _gpt2().double().train()
    optimized = invfx.optimize(model, _text(), check_gradients=False)
    with pytest.raises(invfx.InvfxError, match="input_ids of shape \\[4, 16\\]; it got \\[4, 8\\]"):
        optimized(**_text(4, 8))


def test_hugging_face_model_export_cannot_trace_is_one_invfx_line():
    transformers = model_library("transformers")

    class Branchy(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self):
            super().__init__(transformers.PretrainedConfig())
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else -x  # (data-dependent control flow)

    with pytest.raises(invfx.TraceError, match="^Branchy \\(a Hugging Face model\\) cannot be traced by "
                                               "torch.export: [^\\n]*$"):
        invfx.optimize(Branchy(), torch.randn(2, 4))
