"""lightning_charlm: character-level bigram and GPT language models on PyTorch Lightning."""

import importlib

# Imported on first use: `charlm --help` must not wait seconds for torch and Lightning to import.
_HOMES = {
    "BigramLM": "module",
    "GenerationConfig": "sampling",
    "CharDataModule": "data",
    "CharLM": "module",
    "CharTokenizer": "tokenizer",
    "GPTLM": "module",
    "generate": "sampling",
    "load": "api",
    "sample_text": "sampling",
    "stream_text": "sampling",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lightning_charlm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lightning_charlm.{_HOMES[name]}"), name)
