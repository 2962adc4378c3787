"""Example models: the four deterministic TorchScript files that
``config/tensorq.toml`` serves (``tensorq models build-examples``), used by
the demo, the benchmark and the tests.

- ``mlp``: x float32 [256] -> y float32 [10]; cheap, so batching overhead shows.
- ``cnn``: x float32 [3, 32, 32] -> logits float32 [10]; compute-bound
  (about 1,000 items/s at batch 32 on one CPU thread).
- ``seq``: tokens int64 [-1] (pad 0) -> (pooled float32 [16], scores float32 [-1]);
  padding changes neither output on a row's real positions.
- ``encoder``: a small transformer sentence encoder (BERT-like: token and
  position embeddings, 2 pre-norm self-attention layers of width 64 with 4
  heads) with input_ids int64 [-1] and attention_mask int64 [-1] (both pad 0)
  -> embedding float32 [64], the mean over the real tokens; padded positions
  are masked out of attention and of the mean, so padding changes nothing
  beyond float rounding. Its cost grows with the padded length (attention
  quadratically), as a real text model's does.

Every op works row by row (eval mode, no batchnorm statistics, no dropout),
so a row's output does not depend on the rest of its batch beyond float
rounding. Weights come from a fixed seed per model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


class Cnn(nn.Module):
    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w1, w1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32x32 -> 16x16
            nn.Conv2d(w1, w2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w2, w2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(w2, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 16, padding_idx=0)
        self.score = nn.Linear(16, 1)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        mask = (tokens != 0).unsqueeze(-1).to(torch.float32)  # [n, L, 1]
        emb = self.embed(tokens) * mask  # [n, L, 16]
        count = mask.sum(dim=1).clamp(min=1.0)  # [n, 1]
        pooled = emb.sum(dim=1) / count  # [n, 16]
        scores = (self.score(emb) * mask).squeeze(-1)  # [n, L]; 0 at pad positions
        return pooled, scores


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        n, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [n, heads, L, width/heads]
        attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, length, width))
        return x + self.ff(self.norm2(x))  # type: ignore[no-any-return]


class Encoder(nn.Module):
    def __init__(self, vocab: int = 8192, width: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(512, width)
        self.layers = nn.ModuleList([EncoderLayer(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        x = self.tokens(input_ids) + self.positions(positions)
        real = attention_mask != 0  # [n, L]
        # a query attends to the real keys of its row only (a row with none: to all, not NaN)
        keep = (real | ~real.any(dim=1, keepdim=True))[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        weights = real.unsqueeze(-1).to(x.dtype)
        count = weights.sum(dim=1).clamp(min=1.0)
        return (self.norm(x) * weights).sum(dim=1) / count  # type: ignore[no-any-return]


_MODELS: dict[str, tuple[int, type[nn.Module]]] = {
    "mlp": (1, Mlp),
    "cnn": (2, Cnn),
    "seq": (3, Seq),
    "encoder": (4, Encoder),
}


def build_examples(directory: Path) -> dict[str, Path]:
    """Write ``mlp.pt``, ``cnn.pt``, ``seq.pt`` and ``encoder.pt`` into
    ``directory``; return name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, (seed, cls) in _MODELS.items():
        torch.manual_seed(seed)
        module = torch.jit.script(cls().eval())
        path = directory / f"{name}.pt"
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.jit.save(module, str(partial))
        os.replace(partial, path)  # a worker never loads a half-written file
        paths[name] = path
    return paths
