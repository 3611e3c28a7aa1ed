"""The static KV cache of the GPT's one-token decode step: every layer's keys and values for block_size
positions, allocated once, so the step has the same shapes at every position (it can be compiled and
captured as a CUDA graph). With rotary positions it is a ring: position p lives in slot p % block_size."""

from __future__ import annotations

import torch


class KVCache:
    """`kv` (n_layer, B, 2, H, block_size, hd): keys at [:, :, 0], values at [:, :, 1], side by side so a
    decode step writes both with one op. `pos` is how many positions a multi-token forward (a prefill, from
    an empty cache) has filled."""

    def __init__(self, n_layer: int, block_size: int):
        self.n_layer, self.block_size = n_layer, block_size
        self.kv = None
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) at the current position; return everything cached so far."""
        if self.kv is None:  # allocated on first use, in the dtype autocast gives k (bf16 under bf16-mixed)
            B, H, _, hd = k.shape
            self.kv = k.new_zeros((self.n_layer, B, 2, H, self.block_size, hd))
            torch._dynamo.mark_static_address(self.kv)  # fixed address: CUDA graphs update it in place
            # each layer's views, made once: an eager decode step's small ops cost more than their work
            self.layers = list(self.kv)
            self.keys, self.values = [kv[:, 0] for kv in self.layers], [kv[:, 1] for kv in self.layers]
        end = self.pos + k.size(2)
        kv = self.kv[layer]
        kv[:, 0, :, self.pos : end] = k
        kv[:, 1, :, self.pos : end] = v
        return kv[:, 0, :, :end], kv[:, 1, :, :end]

    def write(
        self, layer: int, slot: torch.Tensor, kv: torch.Tensor, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position's keys and values, kv (B, 2, H, 1, hd), in `slot` (a 1-element tensor); return
        the layer's keys and values, each (B, H, block_size, hd), or only the first `length` slots (eager
        decoding: the unfilled rest would be memory traffic). Without `length` (a compiled step, fixed
        shapes) the views are taken in the graph, from `kv` itself, whose address CUDA graphs know."""
        if length is None:
            cached = self.kv[layer]
            cached.index_copy_(3, slot, kv)
            return cached[:, 0], cached[:, 1]
        self.layers[layer].index_copy_(3, slot, kv)
        return self.keys[layer][:, :, :length], self.values[layer][:, :, :length]
