"""The bigram model: the next character's logits are a row of a V x V table indexed by the current one."""

import torch
from torch import nn


class Bigram(nn.Module):
    # The model only ever looks at the last character, so the sampling loop crops its context to 1.
    block_size = 1

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)  # (B, T) -> (B, T, V)
