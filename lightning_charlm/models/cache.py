"""The static KV cache of the GPT's one-token decode step: every layer's keys and values for block_size
positions, allocated once, so the step has the same shapes at every position (it can be compiled and
captured as a CUDA graph). With rotary positions it is a ring: position p lives in slot p % block_size."""

from __future__ import annotations

import torch


class KVCache:
    """`pos` is how many positions a multi-token forward (a prefill, from an empty cache) has filled."""

    def __init__(self, n_layer: int, block_size: int):
        self.n_layer, self.block_size = n_layer, block_size
        self.k = self.v = None
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) at the current position; return everything cached so far."""
        if self.k is None:  # allocated on first use, in the dtype autocast gives k (bf16 under bf16-mixed)
            shape = (self.n_layer, *k.shape[:2], self.block_size, k.size(3))
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
            for t in (self.k, self.v):  # fixed addresses: CUDA graphs may update them in place
                torch._dynamo.mark_static_address(t)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store one position's k, v (B, H, 1, hd) in `slot` (a 1-element tensor); return all block_size."""
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]
