"""Plainly written models (no invfx import in their definitions) used by the tests, the benchmarks, the demo
and the notebooks: what ``invfx.optimize`` must handle as users write it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CouplingBlock", "RevNetMLP", "GlowStep", "Glow", "ReversibleBlock", "ReversibleTransformer", "BasicBlock",
           "ResNet", "TransformerBlock", "Transformer"]


class CouplingBlock(nn.Module):
    """RevNet block: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, on the two halves of the last dimension."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        half = width // 2

        def mlp():
            return nn.Sequential(nn.LayerNorm(half), nn.Linear(half, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, half))

        self.F, self.G = mlp(), mlp()

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], dim=-1)


class RevNetMLP(nn.Module):
    """A stem, ``depth`` coupling blocks, a head."""

    def __init__(self, depth: int = 8, width: int = 64, hidden: int = 128, classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList([CouplingBlock(width, hidden, dropout) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class GlowStep(nn.Module):
    """Glow's step written out: actnorm ``(x + loc) * exp(logs)``, an invertible 1x1 convolution through
    ``F.conv2d`` with a square weight, an affine coupling with a sigmoid scale."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        self.weight = nn.Parameter(rotation.reshape(channels, channels, 1, 1))
        self.net = nn.Sequential(nn.Conv2d(channels // 2, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, x):
        x = (x + self.loc) * torch.exp(self.logs)
        x = F.conv2d(x, self.weight)
        x1, x2 = x.chunk(2, dim=1)
        shift, scale = self.net(x2).chunk(2, dim=1)
        y1 = x1 * torch.sigmoid(scale + 2.0) + shift
        return torch.cat([y1, x2], dim=1)


class Glow(nn.Module):
    """``levels`` times: squeeze (``pixel_unshuffle``) then ``depth`` Glow steps."""

    def __init__(self, channels: int = 3, levels: int = 2, depth: int = 4, hidden: int = 32):
        super().__init__()
        self.levels = nn.ModuleList()
        for _ in range(levels):
            channels *= 4
            self.levels.append(nn.ModuleList([GlowStep(channels, hidden) for _ in range(depth)]))

    def forward(self, x):
        for steps in self.levels:
            x = F.pixel_unshuffle(x, 2)
            for step in steps:
                x = step(x)
        return x


class ReversibleBlock(nn.Module):
    """Two streams: ``y1 = x1 + attention(ln(x2))``, ``y2 = x2 + mlp(ln(y1))``."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x1, x2):
        h = self.ln1(x2)
        y1 = x1 + self.attention(h, h, h, need_weights=False)[0]
        y2 = x2 + self.mlp(self.ln2(y1))
        return y1, y2


class ReversibleTransformer(nn.Module):
    """An embedding, ``depth`` two-stream blocks, the streams joined for the head."""

    def __init__(self, features: int = 16, dim: int = 32, depth: int = 4, heads: int = 4, hidden: int = 64,
                 classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.ModuleList([ReversibleBlock(dim, heads, hidden, dropout) for _ in range(depth)])
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x1 = x2 = self.embed(x)
        for block in self.blocks:
            x1, x2 = block(x1, x2)
        return self.head(torch.cat([x1, x2], dim=-1))


class BasicBlock(nn.Module):
    """A residual block without downsampling: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``, 3x3 convolutions
    (padding 1, no bias) that keep the channel count. ReLU discards the sign of negative inputs, so nothing in
    it can be inverted: memory is saved here only by recomputing."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + x)


class ResNet(nn.Module):
    """A plain ResNet: ``stem`` (3x3 conv from ``in_channels``, BatchNorm, ReLU), ``depth`` :class:`BasicBlock`
    in the ``nn.Sequential`` ``blocks``, then ``head`` (adaptive average pool, flatten, linear to ``classes``).

    ``blocks`` is an ``nn.Sequential`` so that ``torch.utils.checkpoint.checkpoint_sequential(model.blocks,
    segments, h)`` applies to it; ``forward`` is ``head(blocks(stem(x)))``. The stem's stride is ``stem_stride``;
    nothing else changes the spatial size. In train mode every BatchNorm updates its running statistics at each
    forward, so a recomputed forward updates them again unless the recomputation prevents it.
    """

    def __init__(self, depth: int = 8, channels: int = 16, classes: int = 10, stem_stride: int = 1,
                 in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(channels) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``x + proj(attention(ln1(x)))``, then ``x + mlp(ln2(x))`` (Linear, GELU,
    Linear), with dropout on the attention weights' output and on each residual branch. Nothing in it can be
    inverted (the residual adds read ``x`` again): memory is saved here only by recomputing."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.drop(self.proj(attended))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    """``depth`` :class:`TransformerBlock` in the ``nn.Sequential`` ``blocks`` between a linear ``embed`` from
    ``features`` and a ``head`` (LayerNorm, mean over tokens, linear to ``classes``); input (batch, tokens,
    features). ``blocks`` is an ``nn.Sequential`` for ``checkpoint_sequential``."""

    def __init__(self, features: int = 16, dim: int = 32, depth: int = 4, heads: int = 4, hidden: int = 64,
                 classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, hidden, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(dim=1))
