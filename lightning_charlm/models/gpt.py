"""A GPT in pure PyTorch: pre-LayerNorm blocks of causal SDPA attention and a 4x MLP, plus a KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    # Recompute each block's activations in backward: less memory for one more forward pass of each block.
    checkpointing: bool = False


class KVCache:
    """Keys and values of every layer for block_size positions, allocated once, so a decode step has the same
    shapes at every position (which lets it be compiled and captured as a CUDA graph); `pos` is how many
    positions a multi-token forward (a prefill) has filled."""

    def __init__(self, cfg: GPTConfig):
        self.cfg = cfg
        self.k = self.v = None
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) at the current position; return everything cached so far."""
        if self.k is None:  # allocated on first use, in the dtype autocast gives k (bf16 under bf16-mixed)
            shape = (self.cfg.n_layer, *k.shape[:2], self.cfg.block_size, k.size(3))
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
            for t in (self.k, self.v):  # fixed addresses: CUDA graphs may update them in place
                torch._dynamo.mark_static_address(t)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store one position's k, v (B, H, 1, hd) at `pos` (a 1-element tensor); return all block_size."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, step: tuple | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, hd)
        if step is not None:  # one decode step: attend to the cached positions up to `pos`
            pos, mask, length = step
            k, v = cache.write(layer, pos, k, v)
            if length is not None:  # eager: read only the filled part (the masked rest is memory traffic)
                k, v = k[:, :, :length], v[:, :, :length]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        # Causal masking is needed when queries and keys start together (training, or a prefill from an
        # empty cache); a single decode step may attend to every cached position.
        causal = cache is None or cache.pos == 0
        if cache is not None:
            if T > 1 and cache.pos:
                raise ValueError("a multi-token forward with a KV cache must start from an empty cache")
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and T > 1, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.n_embd, bias=False), CausalSelfAttention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.n_embd, bias=False), MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, step: tuple | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer, step)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying: one matrix reads and writes characters
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg)

    def compile_blocks(self) -> None:
        """torch.compile each block in place for training (state_dict keys unchanged). The blocks share one
        code path, so the first block's compiled graph serves them all: compile time is about one block's,
        not the net's. Shapes are static (training batches all have one shape)."""
        for block in self.blocks:
            block.compile(dynamic=False)

    def decode_step(
        self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache, length: int | None = None
    ) -> torch.Tensor:
        """Logits (B, V) of the next token after `token` (B, 1) at position `pos` (a 1-element tensor on the
        device), with the cache already holding positions < pos. Without `length` every shape is the same at
        every position and nothing waits for the host, so the step can be compiled (fullgraph) and captured
        as a CUDA graph; eager callers pass length = pos + 1 to attend to the filled part only."""
        x = self.wte(token) + self.wpe(pos)  # (B, 1, C)
        mask = None if length else (torch.arange(self.cfg.block_size, device=pos.device) <= pos)[None]
        for i, block in enumerate(self.blocks):
            x = block.forward(x, cache, i, (pos, mask, length))
        return self.head(self.ln_f(x))[:, -1]

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if cache is not None or not self.training:
                # Evaluation and decoding call the eager forward even when the block is compiled: they run
                # rarely, in other shapes (and the cache position changes at every token), so compiling
                # them would cost more start-up time than it saves.
                x = block.forward(x, cache, i)
            elif self.cfg.checkpointing:
                # The RNG state is replayed when recomputing, so dropout masks and gradients are unchanged.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cache is not None:
            cache.pos += T
        return self.head(self.ln_f(x))  # (B, T, V)
