"""Where runs and checkpoints live: finding the newest run to resume, logging a resumed run into its own
folder, checking a checkpoint file safely before Lightning touches it, and writing checkpoints."""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, the run folder is not guarded
    fcntl = None
from lightning.fabric.plugins import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_charlm.errors import CharLMError


def check_checkpoint(path: str) -> dict[str, Any]:
    """Load `path` the safe way (tensors and primitives only, memory-mapped) or raise a CharLMError that
    names it."""
    if Path(path).is_dir():
        raise CharLMError(f"--ckpt_path {path} is a directory: name a .ckpt file")
    if not Path(path).is_file():
        raise CharLMError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
    missing = [k for k in ("pytorch-lightning_version", "hyper_parameters") if k not in ckpt]
    if missing or "vocab" not in ckpt["hyper_parameters"]:
        raise CharLMError(
            f"{path} is not a charlm checkpoint: it lacks {', '.join(missing) or 'the vocabulary'}, which "
            "`charlm fit` writes into every checkpoint"
        )
    return ckpt


# How to run, not what the model is: on resume the command line wins over the checkpoint.
RUNTIME_OPTIONS = ("compile", "fused")


def resume_conflicts(class_path: str, asked: dict[str, Any], held: dict[str, Any]) -> list[str]:
    """The model options the command sets (away from the class default) that differ from the checkpoint's:
    Lightning would silently train or evaluate the checkpoint's values instead."""
    module, name = class_path.rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (YAML lists vs saved tuples)
    return [
        f"--model.{key} {plain(value)} (the checkpoint has {plain(held.get(key))})"
        for key, value in asked.items()
        if key in params
        and key not in ("vocab", *RUNTIME_OPTIONS)
        and plain(value) != plain(params[key].default)
        and plain(value) != plain(held.get(key))
    ]


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


class RunFolder:
    """The run folder a `fit` writes, held for the process's lifetime with an advisory lock (released by
    the OS when the process ends or dies), so a second process cannot write the same folder. A folder this
    run created is removed again if the run fails before it holds a checkpoint: a refused or interrupted
    start leaves nothing behind."""

    def __init__(self, folder: Path):
        self.folder, self.fresh = folder, not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / ".lock", "a+")  # noqa: SIM115  (held until the process ends)
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


def continue_run(logger, ckpt: Path) -> None:
    """Log a resumed run into the folder its checkpoint lives in, so TensorBoard curves continue."""
    tb = _tensorboard_args(logger)
    run = Path(os.path.relpath(ckpt.parent.parent))  # relative like the saved dirpath, so its state reloads
    if tb is not None and ckpt.parent.name == "checkpoints" and run.name.startswith("version_"):
        tb.save_dir, tb.name, tb.version = str(run.parent.parent), run.parent.name, run.name


class BackgroundCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint in a background thread, straight to `NAME.tmp` beside `NAME`, then renames it.

    Training goes on while a file is written (a 10 M-parameter GPT with AdamW is ~130 MB: ~0.2 s of disk
    time, twice at a validation that improves: best.ckpt and last.ckpt). The tensors are copied on the
    calling thread first, since training keeps changing them in place, so a file holds exactly the state of
    the step it was asked for. Files are written in order, at most two in flight (one validation's pair):
    a further save, and the end of the run, wait (and raise a write's error, if any). A kill mid-write
    leaves the previous `NAME` intact; nothing is staged in memory or in $TMPDIR, as Lightning's default
    writer does.
    """

    def __init__(self, in_flight: int = 2):
        super().__init__()
        self.in_flight = in_flight
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        while len(self._pending) >= self.in_flight:
            self._pending.pop(0).result()
        copies: dict[tuple, torch.Tensor] = {}

        def copy(t: torch.Tensor) -> torch.Tensor:  # views of one storage (tied weights) stay one copy
            key = (t.device, t.data_ptr(), t.dtype, t.shape, t.stride())
            if key not in copies:
                copies[key] = t.detach().clone()
            return copies[key]

        snapshot = apply_to_collection(checkpoint, torch.Tensor, copy)
        self._executor = self._executor or ThreadPoolExecutor(max_workers=1)  # one thread: files in order
        self._pending.append(self._executor.submit(_write, snapshot, Path(path)))

    def wait(self) -> None:
        """Block until every file asked for is written; raise the first write error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def teardown(self) -> None:
        self.wait()


def _write(checkpoint: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:  # a Python file, so a full disk is an OSError (ENOSPC), not torch's own
            torch.save(checkpoint, f)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CharLMError(
            f"cannot write the checkpoint {path} ({err.strerror or err}); the checkpoints written before are "
            "kept. Free some space (or make the folder writable) and resume with --ckpt_path last"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
