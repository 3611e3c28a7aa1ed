"""The Python API: a trained model from a checkpoint, ready to generate::

import lightning_charlm
lm = lightning_charlm.load("logs/gpt/version_0/checkpoints/best.ckpt", device="cuda")
print(lm.generate("ROMEO:", max_new_tokens=200, seed=1))
for piece in lm.stream("JULIET:", max_new_tokens=200):
    print(piece, end="", flush=True)
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_charlm.errors import CharLMError
from lightning_charlm.module import CharLM


def load(path: str | Path, device: str | torch.device | None = None) -> CharLM:
    """The model a checkpoint holds (GPTLM or BigramLM), on `device` (default: the CPU), in eval mode.

    The file is checked and loaded as tensors and primitives only (weights_only): a checkpoint holding other
    objects is refused, never unpickled. `generate` and `stream` take the fields of GenerationConfig as
    keyword arguments, and give the same text as `charlm predict` for the same seed and precision.
    """
    try:
        device = torch.device(device or "cpu")  # CharLM.load_from_checkpoint checks the file first
    except RuntimeError:  # torch's message lists every device type it knows, dozens
        raise CharLMError(f"device {device!r} is not a device: use 'cpu', 'cuda', 'cuda:1', 'mps'") from None
    present = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not present.get(device.type, True):
        raise CharLMError(f"device {device}: this machine has no {device.type.upper()} device (use 'cpu')")
    model = CharLM.load_from_checkpoint(str(path), map_location=device, weights_only=True)
    return model.to(device).eval()
