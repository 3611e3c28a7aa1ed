"""lightning_charlm: character-level bigram and GPT language models on PyTorch Lightning."""

from lightning_charlm.data import CharDataModule
from lightning_charlm.module import GPTLM, BigramLM, CharLM
from lightning_charlm.sampling import generate, sample_text
from lightning_charlm.tokenizer import CharTokenizer

__all__ = ["BigramLM", "CharDataModule", "CharLM", "CharTokenizer", "GPTLM", "generate", "sample_text"]
