"""A GPT in pure PyTorch: pre-norm blocks of causal SDPA attention and an MLP, with the recipe's parts as
options (models/parts.py): learned or rotary positions, LayerNorm or RMSNorm, gelu, relu^2 or SwiGLU,
QK-norm, a tied or untied head, zero-initialised output projections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_charlm.models.cache import KVCache
from lightning_charlm.models.parts import MLP, MLPS, NORMS, POSITIONS, Rotary, norm, rotate, same_dtype_norm


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
    positions: str = "learned"  # parts.POSITIONS
    norm: str = "layernorm"  # parts.NORMS
    mlp: str = "gelu"  # parts.MLPS
    qk_norm: bool = False  # RMSNorm (with gains) on each head's queries and keys: bounded attention logits
    tie_head: bool = True  # the head reuses the token embedding
    zero_init: bool = False  # output projections (and an untied head) start at zero: blocks start as identity


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.n_embd // cfg.n_head
        self.q_norm = nn.RMSNorm(head_dim) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim) if cfg.qk_norm else None

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, rope=None, band=None):
        B, T, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, hd)
        q, k = self.normed_and_rotated(q, k, rope)
        # Causal masking is needed when queries and keys start together (training, or a prefill from an
        # empty cache).
        causal = cache is None or cache.pos == 0
        if cache is not None:
            if T > 1 and cache.pos:
                raise ValueError("a multi-token forward with a KV cache must start from an empty cache")
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=band, is_causal=causal and T > 1 and band is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    def normed_and_rotated(self, q: torch.Tensor, k: torch.Tensor, rope=None):
        """Queries and keys after QK-norm and rotary positions, where the model has them."""
        if self.q_norm is not None:
            q, k = same_dtype_norm(self.q_norm, q), same_dtype_norm(self.k_norm, k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return q, k

    def decode(self, h: torch.Tensor, cache: KVCache, layer: int, step: tuple, rope=None) -> torch.Tensor:
        """Attention of one new position per row, h (B, C) after the norm, to every cached position up to it
        (GPT.decode_step): the heads' outputs (B, C), before the projection."""
        B, C = h.shape
        slot, mask, length, slices = step
        # qkv.weight @ h.T: the GEMM form that reads the weight once for all rows (GPT.decode_step), then
        # rows again for attention (a copy of B x 3C numbers; none at batch 1).
        qkv = add_product(None, self.qkv.weight, h.t(), slices)
        qkv = (qkv.t().contiguous() if B > 1 else qkv).view(B, 3, self.n_head, 1, C // self.n_head)
        q, kv = qkv[:, 0], qkv[:, 1:]  # (B, H, 1, hd), keys and values (B, 2, H, 1, hd)
        if self.q_norm is not None or rope is not None:
            q, k = self.normed_and_rotated(q, qkv[:, 1], rope)
            kv = torch.stack([k, qkv[:, 2]], 1)
        k, v = cache.write(layer, slot, kv, length)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = norm(cfg.norm, cfg.n_embd), CausalSelfAttention(cfg)
        self.ln2, self.mlp = norm(cfg.norm, cfg.n_embd), MLP(cfg.mlp, cfg.n_embd, cfg.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, rope=None, band=None):
        x = x + self.attn(self.ln1(x), cache, layer, rope, band)
        return x + self.mlp(self.ln2(x))

    def decode(self, xt: torch.Tensor, cache: KVCache, layer: int, step: tuple, rope=None) -> torch.Tensor:
        """forward of one new position per row, the residual stream transposed: xt (C, B); GPT.decode_step."""
        slices = step[-1]
        y = self.attn.decode(self.ln1(xt.t()), cache, layer, step, rope)
        xt = add_product(xt, self.attn.proj.weight, y.t(), slices)
        h = add_product(None, self.mlp.fc.weight, self.ln2(xt.t()).t(), slices)
        return add_product(xt, self.mlp.proj.weight, self.mlp.act(h, dim=0), slices)


def add_product(
    x: torch.Tensor | None, weight: torch.Tensor, h: torch.Tensor, slices: int = 1
) -> torch.Tensor:
    """x + weight @ h (without x: weight @ h), h (K, B), in one op (a decode step's ops are its cost); under
    autocast the product comes out in bf16 and the residual stream stays in float32, as in forward.

    With `slices` > 1 and one column (GPT.decode_step at batch 1 on a CPU) the weight's rows are cut into
    that many slices and multiplied as one batched product, a slice per core: here (MKL 2024.2, AMD EPYC)
    MKL runs a matrix-vector product on one core, which streams the weight at about half the speed two do
    (the 2-core test machine: every weight of configs/gpt.yaml's net in 3.2 ms a token instead of 5.1; at
    batch 16 no gain). Every slice reads h through one view with strides (0, 1, K): with the strides a
    (K, 1) column gets, (1, 1), bmm takes a path ~3x slower."""
    M, K = weight.shape
    if slices > 1 and h.size(1) == 1 and M % slices == 0:
        w, hs = weight.view(slices, M // slices, K), h.contiguous().as_strided((slices, K, 1), (0, 1, K))
        if x is None or torch.is_autocast_enabled(h.device.type):
            y = torch.bmm(w, hs).view(M, 1)
            return y if x is None else x + y
        return torch.baddbmm(x.reshape(slices, M // slices, 1), w, hs).view(M, 1)
    if x is None:
        return torch.mm(weight, h)
    if torch.is_autocast_enabled(x.device.type):
        return x + torch.mm(weight, h)
    return torch.addmm(x, weight, h)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        for name, kinds in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(cfg, name) not in kinds:
                raise ValueError(f"{name} must be one of {', '.join(kinds)}, got {getattr(cfg, name)!r}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        longest = max(2 * cfg.block_size, self.reach + 1)  # decoding's positions; the band's tokens
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, longest) if cfg.positions == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg.norm, cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.head.weight = self.wte.weight  # one matrix reads and writes characters
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or (name == "head.weight" and cfg.zero_init):
                nn.init.normal_(p, mean=0.0, std=0.0 if cfg.zero_init else 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def slides(self) -> bool:
        """Whether past block_size this GPT attends over a sliding window (rotary positions: attention sees
        only relative positions): every layer attends to the last block_size positions, so through the
        layers the last token sees up to `reach` tokens back, and a decode step only replaces the oldest
        slot of the KV ring. With learned positions the context is cut to block_size instead."""
        return self.rotary is not None

    @property
    def reach(self) -> int:
        """Tokens before the last that can still change its logits under a sliding window."""
        return self.cfg.n_layer * (self.cfg.block_size - 1)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer, self.cfg.block_size)

    def shift_cache(self, cache: KVCache) -> None:
        """Rotate every cached key back by block_size positions (in place: the addresses stay fixed), so the
        decode positions go on from pos - block_size (Rotary)."""
        keys = cache.kv[:, :, 0]
        cos, sin = self.rotary(torch.tensor(self.cfg.block_size, device=keys.device))
        keys.copy_(rotate(keys, cos, -sin))

    def compile_blocks(self) -> None:
        """torch.compile each block in place for training (state_dict keys unchanged). The blocks share one
        code path, so the first block's compiled graph serves them all: compile time is about one block's,
        not the net's. Shapes are static (training batches all have one shape)."""
        for block in self.blocks:
            block.compile(dynamic=False)

    def decode_step(
        self,
        token: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        length: int | None = None,
        slices: int = 1,
    ) -> torch.Tensor:
        """Logits (B, V) of the next token after `token` (B, 1) at position `pos` (a 1-element tensor on the
        device, < 2 * block_size; slot pos % block_size), with the cache holding the positions before it.
        Without `length` every shape is the same at every position and nothing waits for the host, so the
        step can be compiled (fullgraph) and captured as a CUDA graph; eager callers pass the number of
        filled slots (at most block_size) to attend to those only, and at batch 1 on a CPU `slices`, the
        number of cores, to split each weight's product across them (add_product).

        A step of this small net is bound by reading the weights and by the cost of each op, not by
        arithmetic: on the 2-core test machine the step of a 12-wide net (the same ~210 ops, next to no
        work) takes ~1.5 ms, so the step is written with as few ops as it can (Block.decode; the cache's
        views are made once). The residual stream runs transposed,
        (C, B), as weight @ activations: on the 2-core test machine that GEMM is ~30% faster at batch 16
        than activations @ weight.T (the same at batch 1)."""
        x, rope = self.wte(token[:, 0]), None  # (B, C)
        if self.rotary is None:
            x = x + self.wpe(pos)
        else:
            rope = self.rotary(pos)
        block = self.cfg.block_size
        mask = None if length else (torch.arange(block, device=pos.device) <= pos)[None]
        step, xt = (pos % block, mask, length, slices), x.t()
        for i, b in enumerate(self.blocks):
            xt = b.decode(xt, cache, i, step, rope)
        return self.head(self.ln_f(xt.t()))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V). Longer than block_size (rotary, no cache): attention over a sliding window of
        block_size positions (the band), at most reach + 1 tokens."""
        B, T = idx.shape
        start, size = (cache.pos if cache is not None else 0), self.cfg.block_size
        longest = self.reach + 1 if self.slides and cache is None else size
        if start + T > longest:
            raise ValueError(f"sequence of {start + T} tokens exceeds the {longest} this GPT can read")
        pos = torch.arange(start, start + T, device=idx.device)
        band = None
        if T > size:  # each position attends to itself and the block_size - 1 before it
            band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < size)
        x, rope = self.wte(idx), None  # (B, T, C)
        if self.rotary is None:
            x = x + self.wpe(pos)
        else:
            rope = self.rotary(pos)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if cache is not None or not self.training:
                # Evaluation and decoding call the eager forward even when the block is compiled: they run
                # rarely, in other shapes (and the cache position changes at every token), so compiling
                # them would cost more start-up time than it saves.
                x = block.forward(x, cache, i, rope, band)
            elif self.cfg.checkpointing:
                # The RNG state is replayed when recomputing, so dropout masks and gradients are unchanged.
                x = checkpoint(block, x, None, 0, rope, use_reentrant=False)
            else:
                x = block(x, None, 0, rope)
        if cache is not None:
            cache.pos += T
        return self.head(self.ln_f(x))  # (B, T, V)
