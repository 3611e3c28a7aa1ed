"""The GPT's interchangeable parts: norms, MLPs and rotary position embeddings (RoPE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu2", "swiglu")
POSITIONS = ("learned", "rope")


def norm(kind: str, dim: int) -> nn.Module:
    """A pre-norm: LayerNorm without bias (GPT-2's, centred), or RMSNorm (only scaled: one reduction less)."""
    return nn.LayerNorm(dim, bias=False) if kind == "layernorm" else nn.RMSNorm(dim)


def same_dtype_norm(rms: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`rms(x)` with its gains in x's dtype: under bf16 autocast q and k come out of a Linear in bf16, and
    RMSNorm (unlike LayerNorm, not on autocast's float32 list) would leave its fused kernel for a slow path
    on the dtype mismatch."""
    return F.rms_norm(x, rms.normalized_shape, rms.weight.to(x.dtype), rms.eps)


class MLP(nn.Module):
    """gelu: GPT-2's 4x MLP. relu2: relu(x)^2 (the modded-nanogpt speedrun's), same shape. swiglu: a gated
    silu unit (LLaMA's) with 8/3x hidden width, so all three have about 8 * n_embd^2 weights."""

    def __init__(self, kind: str, n_embd: int, dropout: float):
        super().__init__()
        self.kind = kind
        hidden = 4 * n_embd if kind != "swiglu" else -(-8 * n_embd // 3 // 8) * 8  # rounded up to 8
        self.fc = nn.Linear(n_embd, hidden * (2 if kind == "swiglu" else 1), bias=False)
        self.proj = nn.Linear(hidden, n_embd, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))

    def act(self, h: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The nonlinearity on fc's output h, its features along `dim` (0 in the transposed decode step)."""
        if self.kind == "gelu":
            return F.gelu(h)
        if self.kind == "relu2":
            return F.relu(h).square()
        gate, up = h.chunk(2, dim=dim)
        return F.silu(gate) * up


class Rotary(nn.Module):
    """cos and sin of RoPE's angles for positions 0 .. length - 1, computed in float64 once. The GPT asks for
    the longest positions it uses: a sliding-window forward (up to `GPT.reach` + 1) and a decode step in
    the KV ring, kept below 2 * block_size by `GPT.shift_cache` so the angles stay small enough for float32.
    """

    def __init__(self, head_dim: int, length: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (length, hd/2)
        # Not saved in checkpoints (persistent=False): derived from the config, like the mask.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at positions `pos` (T,): each (T, hd/2)."""
        return self.cos[pos], self.sin[pos]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) with each pair (x_i, x_{i + hd/2}) turned by its angle; cos, sin (T, hd/2)."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).type_as(x)
