"""Pure PyTorch models (no Lightning import): one interface, `forward(idx) -> logits (B, T, V)`."""

from lightning_charlm.models.bigram import Bigram
from lightning_charlm.models.gpt import GPT, GPTConfig, KVCache

__all__ = ["GPT", "Bigram", "GPTConfig", "KVCache"]
