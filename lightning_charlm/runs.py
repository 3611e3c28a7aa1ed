"""Where runs and checkpoints live: finding the newest run to resume, logging a resumed run into its own
folder, and checking a checkpoint file safely before Lightning touches it."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import yaml

from lightning_charlm.errors import CharLMError


def check_checkpoint(path: str) -> None:
    """Load `path` the safe way (tensors and primitives only) or raise a CharLMError that names it."""
    if not Path(path).is_file():
        raise CharLMError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # not a pickle at all, rather than a pickle that calls code
            raise CharLMError(f"{path} is not a readable checkpoint (truncated or corrupt?)") from None
        raise CharLMError(
            f"refused to load {path}: it holds objects other than tensors and primitives, which could run "
            f"code when unpickled ({str(err).splitlines()[0]})"
        ) from None
    except Exception as err:  # truncated zip, random bytes, ...: torch raises several types
        raise CharLMError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CharLMError(f"{path} is not a Lightning checkpoint (no state_dict)")


def model_named(args: list[str]) -> bool:
    """Whether the user chose a model class on the command line or in a -c config file."""
    for i, arg in enumerate(args):
        if arg == "--model" or arg.startswith(("--model=", "--model.class_path")):
            return True
        path = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path and Path(path).is_file():
            cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict | str):
                return True
    return False


def _tensorboard_args(logger):
    if getattr(logger, "class_path", "").endswith("TensorBoardLogger"):
        return logger.init_args
    return None


def newest_last_checkpoint(logger) -> Path:
    """The last.ckpt of the highest logs/<name>/version_N, or a CharLMError naming where it looked."""
    tb = _tensorboard_args(logger)
    if tb is None:
        raise CharLMError(
            "--ckpt_path last needs the TensorBoard logger to know where runs live; pass a path"
        )
    root = Path(tb.save_dir) / tb.name
    found = sorted(
        (int(p.parent.parent.name.split("_")[1]), p)
        for p in root.glob("version_*/checkpoints/last.ckpt")
        if p.parent.parent.name.split("_")[1].isdigit()
    )
    if not found:
        raise CharLMError(
            f"--ckpt_path last: no run to resume, {root}/version_*/checkpoints/last.ckpt does not exist. "
            "Start a new run by leaving out --ckpt_path, or pass the checkpoint's path."
        )
    return found[-1][1]


def continue_run(logger, ckpt: Path) -> None:
    """Log a resumed run into the folder its checkpoint lives in, so TensorBoard curves continue."""
    tb = _tensorboard_args(logger)
    run = Path(os.path.relpath(ckpt.parent.parent))  # relative like the saved dirpath, so its state reloads
    if tb is not None and ckpt.parent.name == "checkpoints" and run.name.startswith("version_"):
        tb.save_dir, tb.name, tb.version = str(run.parent.parent), run.parent.name, run.name
