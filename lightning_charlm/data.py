"""CharDataModule: a contiguous 90/10 split, random training windows, strided validation windows, prompts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_charlm.corpus import corpus_path, read_corpus
from lightning_charlm.errors import CharLMError
from lightning_charlm.prepared import PREPARE_MIN_BYTES, prepared_ids, remap
from lightning_charlm.tokenizer import CharTokenizer

DEFAULT_BLOCK_SIZE = 256  # windows for a model without a context length of its own (the bigram)
MAX_PROMPTS = 10_000_000  # copies of the prompts to continue: a larger count is a typo
IGNORE = -100  # cross_entropy's ignore_index: targets already scored by an earlier validation window


def window_length(block_size: int | None, model_options) -> int:
    """The data windows' length: --data.block_size, else the model's context length (its block_size option),
    else DEFAULT_BLOCK_SIZE for a model without one. The one rule, for the CLI and the datamodule alike."""
    if block_size is not None:
        return block_size
    return model_options.get("block_size") or DEFAULT_BLOCK_SIZE


class RandomWindows(IterableDataset):
    """Endless batches of random windows: x = data[i : i + T], y = data[i + 1 : i + T + 1].

    A whole batch is one gather, not a per-sample Python loop, on the device `data` lives on: with the split
    on the GPU, only the B start offsets cross the bus each step. The offsets are drawn on the CPU, so a run
    draws the same windows on any device. The state is the number of batches drawn: restoring re-seeds and
    fast-forwards, so a resumed run draws exactly the windows the uninterrupted run would have, on every
    rank (each has its own seed), even though Lightning saves rank 0's state only.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        self.offsets = torch.arange(block_size + 1, device=data.device)
        self._restart(0)

    def _restart(self, batches: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        for _ in range(batches):  # the same draws as training made, so the generator lands on the same state
            self._draw()
        self.drawn = batches

    def _draw(self) -> torch.Tensor:
        return torch.randint(len(self.data) - self.block_size, (self.batch_size, 1), generator=self.generator)

    def __iter__(self):
        while True:
            ix = self._draw()
            self.drawn += 1
            chunk = self.data[ix.to(self.data.device, non_blocking=True) + self.offsets].long()  # (B, T + 1)
            yield chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        # Lightning fetches one batch ahead of the step it checkpoints: resume by drawing that batch again.
        return {"batches": max(0, self.drawn - 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restart(state["batches"])


class StridedWindows(Dataset):
    """Fixed windows that predict every character after the first exactly once.

    Windows start every `stride` characters, plus one flush with the end; a target an earlier window already
    scored is set to IGNORE, so the token-weighted mean over all windows is the exact loss of the split.
    With stride < block_size later windows score only their new targets, each with more left context.
    Each window is cut when it is read: a large validation split is not copied into memory as windows.
    """

    def __init__(self, data: torch.Tensor, block_size: int, stride: int):
        self.data, self.block_size = data, block_size
        n = len(data) - 1  # number of targets
        self.starts = list(range(0, n - block_size + 1, stride))
        if self.starts[-1] + block_size < n:
            self.starts.append(n - block_size)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, block = self.starts[i], self.block_size
        chunk = self.data[s : s + block + 1].long()
        x, y = chunk[:-1], chunk[1:].clone()
        # Target j is character s + 1 + j; the previous window scored every character up to its end.
        prev_end = self.starts[i - 1] + block if i else 0
        y[: max(0, prev_end - s)] = IGNORE
        return x, y


class Prompts(Dataset):
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]


class CharDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        block_size: int | None = None,
        batch_size: int = 64,
        val_stride: int | None = None,
        val_batch_size: int = 64,
        seed: int = 1337,
        vocab: str | None = None,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        num_samples: int = 1,
    ):
        """The corpus and its windows; for predict, the prompts (how they are continued: --generate.*).

        Args:
            path: the corpus, a UTF-8 text file; default tiny Shakespeare ($CHARLM_DATA_DIR, the cache, or a
                download).
            block_size: characters per training and validation window; default the model's context
                (--model.block_size), or 256 for a model without one (the bigram).
            batch_size: training windows per step (per device); for predict, prompts per batch.
            val_stride: distance between validation window starts (default block_size: no overlap).
            val_batch_size: validation windows per batch (per device).
            seed: seeds the training windows (offset by the global rank, so ranks differ).
            vocab: set from the corpus or the checkpoint; not an option to give.
            prompts: predict: texts to continue (a list: '["ROMEO:", "JULIET:"]').
            prompts_file: predict: a UTF-8 file, one prompt per line; `-` reads them from stdin.
            num_samples: predict: continuations per prompt.
        """
        super().__init__()
        for name, value in [
            ("block_size", 1 if block_size is None else block_size),
            ("batch_size", batch_size),
            ("num_samples", num_samples),
            ("val_batch_size", val_batch_size),
        ]:
            if value < 1:
                raise CharLMError(f"data.{name} must be a positive integer, got {value}")
        if num_samples > MAX_PROMPTS:
            raise CharLMError(f"data.num_samples must be at most {MAX_PROMPTS:,}")
        if val_stride is not None and val_stride < 1:
            raise CharLMError(f"data.val_stride must be between 1 and block_size, got {val_stride}")
        # The vocabulary is the model's hyperparameter. Not merged into the logger's hyperparameters either:
        # Lightning refuses a merge where data and model share a key with two values (block_size may
        # rightly be shorter here than the model's context). config.yaml records them all.
        self.save_hyperparameters(ignore=["vocab"], logger=False)
        self._vocab = vocab
        self._splits: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prompts: list[str] | None = None

    @property
    def vocab(self) -> str:
        """Sorted unique characters of the corpus; read lazily so `predict` never needs the corpus."""
        if self._vocab is None:
            self._load()
        return self._vocab

    def _load(self) -> None:
        path = corpus_path(self.hparams.path)
        if path.stat().st_size >= PREPARE_MIN_BYTES:  # encoded once, then memory-mapped (prepared.py)
            vocab, data = prepared_ids(path)
            if self._vocab not in (None, vocab):  # a checkpoint's vocabulary: its ids (in memory)
                data = remap(data, vocab, self._vocab)
            self._vocab = self._vocab or vocab
        else:
            text = read_corpus(path)
            tok = CharTokenizer(self._vocab) if self._vocab else CharTokenizer.from_text(text)
            self._vocab = tok.vocab
            data = tok.encode(text)
        n_train = int(0.9 * len(data))
        train, val = data[:n_train], data[n_train:]
        self._splits = (train, val)

    @property
    def block_size(self) -> int:
        """--data.block_size, else the context of the model being trained (see window_length)."""
        model = self.trainer.lightning_module if self.trainer else None
        return window_length(self.hparams.block_size, model.hparams if model else {})

    def check(self) -> None:
        """Raise a CharLMError if the windows do not fit: each split needs one window, the stride one."""
        block, stride = self.block_size, self.hparams.val_stride
        if stride is not None and stride > block:
            raise CharLMError(f"data.val_stride must be between 1 and block_size ({block}), got {stride}")
        train, val = self.splits
        need = block + 1
        if min(len(train), len(val)) < need:

            def fits(n: int) -> bool:
                return min(int(0.9 * n), n - int(0.9 * n)) >= need

            shortest = 10 * need  # fits; a few characters less may too (rounding)
            while fits(shortest - 1):
                shortest -= 1
            raise CharLMError(
                f"corpus too short: {len(train) + len(val)} characters split into {len(train)} for training "
                f"and {len(val)} for validation, but one window at block_size {block} needs {need} "
                f"characters in each; use a corpus of at least {shortest} characters or a smaller "
                "--data.block_size"
            )

    @property
    def splits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, val) ids: the first 90% and the last 10% of the corpus, contiguous."""
        if self._splits is None:
            self._load()
        return self._splits

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self.check()
            train, val = self.splits
            rank = self.trainer.global_rank if self.trainer else 0
            hp, block = self.hparams, self.block_size
            # The training split moves to the accelerator once (a few MB as uint8 ids); windows are then
            # cut there, with no host gather and copy per step.
            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            self.train_set = RandomWindows(train.to(device), block, hp.batch_size, hp.seed + rank)
            self.val_set = StridedWindows(val, block, hp.val_stride or block)

    def train_dataloader(self) -> RandomWindows:
        # The iterable itself, not a DataLoader around it: Lightning saves and restores the state of the
        # loaders it is given, and a DataLoader has none. Batches are already whole, so no workers are needed.
        return self.train_set

    def val_dataloader(self) -> DataLoader:
        # A private generator: a DataLoader draws a base seed from the global RNG at every iter(), and
        # validation must not move the RNG that dropout uses, or resumed runs would drift.
        loader_rng = torch.Generator().manual_seed(0)
        return DataLoader(
            self._shard(self.val_set), batch_size=self.hparams.val_batch_size, generator=loader_rng
        )

    def _shard(self, dataset: Dataset) -> Dataset:
        """This rank's share, every `world_size`-th item: no duplicates and no padding (Lightning's sampler
        pads, which would count some windows twice), so metrics synced over ranks equal one process's."""
        world = self.trainer.world_size if self.trainer else 1
        if world == 1:
            return dataset
        return Subset(dataset, range(self.trainer.global_rank, len(dataset), world))

    def prompt_list(self) -> list[str]:
        """Every prompt, each num_samples times; read once (stdin can be read only once)."""
        if self._prompts is not None:
            return self._prompts
        hp = self.hparams
        prompts = list(hp.prompts or [])
        if hp.prompts_file == "-":
            prompts += sys.stdin.read().splitlines()
        elif hp.prompts_file:
            path = Path(hp.prompts_file)
            if path.is_dir():
                raise CharLMError(f"prompts file {path} is a directory: name a file, one prompt per line")
            if not path.is_file():
                raise CharLMError(f"prompts file not found: {path}")
            try:
                prompts += path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as err:
                raise CharLMError(
                    f"prompts file {path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset "
                    f"{err.start}"
                ) from None
        self._prompts = [p for p in (prompts or [""]) for _ in range(hp.num_samples)]
        return self._prompts

    def predict_dataloader(self) -> DataLoader:
        # Batches of prompt strings: the LightningModule encodes them with its own (checkpoint) vocabulary.
        return DataLoader(
            self._shard(Prompts(self.prompt_list())), batch_size=self.hparams.batch_size, collate_fn=list
        )
