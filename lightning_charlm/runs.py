"""Where runs and checkpoints live: finding the newest run to resume, logging a resumed run into its own
folder (and locking it), and checking a checkpoint file safely before Lightning touches it."""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, the run folder is not guarded
    fcntl = None

from lightning_charlm.errors import CharLMError


def check_checkpoint(path: str) -> dict[str, Any]:
    """Load `path` the safe way (tensors and primitives only, memory-mapped) or raise a CharLMError that
    names it."""
    if Path(path).is_dir():
        raise CharLMError(f"--ckpt_path {path} is a directory: name a .ckpt file")
    if not Path(path).is_file():
        raise CharLMError(f"checkpoint not found: {path}")
    try:
        # What the pickle would import, read without running any of it: anything beyond tensors and
        # primitives could run code when unpickled.
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        ckpt = None if unsafe else torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, random bytes, ...: torch raises several types
        raise CharLMError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from None
    if unsafe:
        raise CharLMError(
            f"refused to load {path}: it holds objects other than tensors and primitives "
            f"({', '.join(unsafe)}), which could run code when unpickled"
        )
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CharLMError(f"{path} is not a Lightning checkpoint (no state_dict)")
    missing = [k for k in ("pytorch-lightning_version", "hyper_parameters") if k not in ckpt]
    if missing or "vocab" not in ckpt["hyper_parameters"]:
        raise CharLMError(
            f"{path} is not a charlm checkpoint: it lacks {', '.join(missing) or 'the vocabulary'}, which "
            "`charlm fit` writes into every checkpoint"
        )
    return ckpt


# How to run, not what the model is: on resume the command line wins over the checkpoint.
RUNTIME_OPTIONS = ("compile", "fused")


# What a GPT is (models/gpt.py GPTConfig), as against how it trains or runs.
SHAPE_OPTIONS = (
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "positions",
    "norm",
    "mlp",
    "qk_norm",
    "tie_head",
)


def resume_conflicts(
    class_path: str, asked: dict[str, Any], held: dict[str, Any], keys: tuple[str, ...] | None = None
) -> list[str]:
    """The model options the command sets (away from the class default) that differ from the checkpoint's:
    Lightning would silently train or evaluate the checkpoint's values instead. With `keys`: those options,
    defaults included (a model named for validate, test or predict, which use the checkpoint's shape)."""
    module, name = class_path.rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (YAML lists vs saved tuples)
    return [
        f"--model.{key} {plain(value)} (the checkpoint has {plain(held.get(key))})"
        for key, value in asked.items()
        if key in params
        and (key in keys if keys else key not in ("vocab", *RUNTIME_OPTIONS))
        and (keys or plain(value) != plain(params[key].default))
        and plain(value) != plain(held.get(key))
    ]


def unheld_test_text(trained: list[float] | None, asked: list[float] | None) -> str | None:
    """Which part of the corpus a model saw that `charlm test` with split `asked` would score (None: the
    test part was held out when it trained with split `trained`, or the split it trained with is unknown)."""
    if not trained or not asked or len(asked) < 3:
        return None
    held_out = trained[2] if len(trained) == 3 else 0.0
    test_start = 1 - asked[2]
    if test_start >= 1 - held_out - 1e-9:
        return None
    return "trained and validated on" if test_start < trained[0] - 1e-9 else "validated on"


def _configs(args: list[str]):
    """The config files these arguments give (-c/--config), parsed; unreadable ones skipped (jsonargparse
    says what is wrong with them)."""
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            try:
                config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError, yaml.YAMLError):
                continue
            if isinstance(config, dict):
                yield config


def model_given(args: list[str]) -> tuple[bool, set[str]]:
    """Whether these arguments choose a model class (`--model X`, or a config file with a `model` entry),
    and the model options they set by name (`--model.KEY`, or a config file's model init_args): not those a
    named class brings with their defaults."""
    named = any(arg == "--model" or arg.startswith(("--model=", "--model.class_path")) for arg in args)
    options = {
        arg[len("--model.") :].split("=", 1)[0].removeprefix("init_args.")
        for arg in args
        if arg.startswith("--model.")
    }
    for config in _configs(args):
        model = config.get("model")
        named |= isinstance(model, str | dict)
        init = model.get("init_args", model) if isinstance(model, dict) else None
        if isinstance(init, dict):
            options |= set(init) - {"class_path"}
    return named, options


def own_checkpoint_folder(dirpath: str | None, logged: bool, root: str | None) -> Path | None:
    """Where best.ckpt and last.ckpt go when not into a run folder: --checkpoint.dirpath, or ./checkpoints
    (under --trainer.default_root_dir) without a logger. None: the run folder's checkpoints/."""
    if dirpath:
        return Path(dirpath)
    return None if logged else Path(root or ".") / "checkpoints"


def _tensorboard_args(logger):
    if getattr(logger, "class_path", "").endswith("TensorBoardLogger"):
        return logger.init_args
    return None


def corpus_of(ckpt: dict[str, Any]) -> str | None:
    """The --data.path a checkpoint was trained on (None: tiny Shakespeare)."""
    return (ckpt.get("datamodule_hyper_parameters") or {}).get("path")


def same_corpus(a: str | None, b: str | None) -> bool:
    """By file name: a run folder copied or moved with its corpus still matches; a wrong file of the same
    name is caught by the vocabulary check."""
    return a == b or (a is not None and b is not None and Path(a).name == Path(b).name)


def newest_last_checkpoint(logger, corpus: str | None, fitting: bool = True) -> Path:
    """The last.ckpt of the highest logs/<name>/version_N trained on `corpus`, or a CharLMError naming where
    it looked (and, when runs on other corpora are there, which)."""
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
            f"--ckpt_path last: no run to {'resume' if fitting else 'use'}, {root}/version_*/checkpoints/"
            "last.ckpt does not exist. "
            + (
                "Start a new run by leaving out --ckpt_path, or pass the checkpoint's path."
                if fitting
                else "Pass the checkpoint's path, or the config of its run (-c) so that `last` looks there."
            )
        )
    others = []
    for _, path in reversed(found):
        try:
            held = corpus_of(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception:  # unreadable: check_checkpoint names the problem once it is chosen
            held = corpus
        if same_corpus(held, corpus):
            return path
        others.append(f"{path.parent.parent.name} on {held or 'tiny Shakespeare'}")
    raise CharLMError(
        f"--ckpt_path last: no run on {corpus or 'tiny Shakespeare'} in {root} ({', '.join(others)}); "
        "pass that run's --data.path, or the checkpoint's path"
    )


class RunFolder:
    """The run folder a `fit` writes, held with an advisory lock until `release` (or until the process
    ends, however it ends), so a second process cannot write the same folder. A folder this run created is
    removed again if the run fails before it holds a checkpoint: a refused or interrupted start leaves
    nothing behind."""

    def __init__(self, folder: Path):
        self.folder, self.fresh = folder, not folder.exists()
        # and the folders above it this run makes (logs/NAME/ of a new name): removed too if left empty
        self.made = [p for p in folder.parents if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / ".lock", "a+")  # noqa: SIM115  (held until release)
        try:
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            raise CharLMError(
                f"the run folder {folder} is in use by another charlm process (PID {holder}); wait for it "
                "to end or stop it, then resume with --ckpt_path last"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()

    def discard_if_empty(self) -> None:
        if self.fresh and not any(self.folder.rglob("*.ckpt")):
            shutil.rmtree(self.folder, ignore_errors=True)
            for parent in self.made:  # innermost first
                try:
                    parent.rmdir()
                except OSError:  # not empty: another run's, made meanwhile
                    break

    def release(self) -> None:
        self._lock.close()  # closing the file drops the lock


def continue_run(logger, ckpt: Path) -> None:
    """Log a resumed run into the folder its checkpoint lives in, so TensorBoard curves continue."""
    tb = _tensorboard_args(logger)
    run = Path(os.path.relpath(ckpt.parent.parent))  # relative like the saved dirpath, so its state reloads
    if tb is not None and ckpt.parent.name == "checkpoints" and run.name.startswith("version_"):
        tb.save_dir, tb.name, tb.version = str(run.parent.parent), run.parent.name, run.name
