"""CharDataModule: a contiguous 90/10 split, random training windows, strided validation windows, prompts."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_charlm.corpus import corpus_files, read_corpus
from lightning_charlm.errors import CharLMError
from lightning_charlm.prepared import PREPARE_MIN_BYTES, prepared_ids, remap
from lightning_charlm.tokenizer import BYTE_VOCAB, CharTokenizer

DEFAULT_SPLIT = [0.9, 0.1]  # training, validation: --data.split's default
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
    on the GPU, only the B start offsets cross the bus each step. A split too large for the device stays on
    the host (a memory-mapped cache): the batch is gathered there, into pinned memory on CUDA, and copied
    without blocking, as uint8 where the vocabulary allows. The offsets are drawn on the CPU, so a run
    draws the same windows on any device. The state is the number of batches drawn: restoring re-seeds and
    fast-forwards, so a resumed run draws exactly the windows the uninterrupted run would have, on every
    rank (each has its own seed), even though Lightning saves rank 0's state only.
    """

    def __init__(
        self,
        data: torch.Tensor,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device | None = None,
    ):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        self.device = data.device if device is None else torch.device(device)
        self.pinned = self.device.type == "cuda" and data.device.type == "cpu"
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
        shape = (self.batch_size, self.block_size + 1)
        while True:
            ix = self._draw()
            self.drawn += 1
            rows = (ix.to(self.data.device, non_blocking=True) + self.offsets).view(-1)
            # Pinned memory comes from torch's caching host allocator, which keeps a block until the copy
            # that reads it is done, so a fresh buffer per batch costs no allocation and no sync. (On the
            # CPU the same code runs unpinned; index_select is ~18x faster there than data[rows].)
            out = torch.empty(
                rows.numel(), dtype=self.data.dtype, device=self.data.device, pin_memory=self.pinned
            )
            chunk = torch.index_select(self.data, 0, rows, out=out).to(self.device, non_blocking=True)
            chunk = chunk.view(shape).long()  # (B, T + 1)
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


def sample_numbers(prompts: list[str]) -> list[int]:
    """Which sample of its prompt each one is (0 the first): its count of equal prompts before it."""
    seen: Counter[str] = Counter()
    numbers = []
    for prompt in prompts:
        numbers.append(seen[prompt])
        seen[prompt] += 1
    return numbers


class Prompts(Dataset):
    """(prompt, which sample of it) pairs: the number makes copies of a prompt differ, wherever they land
    (batch, rank), and is counted here, over every prompt, before the ranks take their shares."""

    def __init__(self, prompts: list[str]):
        self.prompts, self.samples = prompts, sample_numbers(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.prompts[i], self.samples[i]


def _free_cuda_memory(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def on_device(nbytes: int, device: torch.device, wanted: bool | None = None, free=_free_cuda_memory) -> bool:
    """Whether a training split of `nbytes` lives on `device`: as asked, else when it takes at most a
    quarter of the device's free memory (what is left is the model's, its optimizer's and activations')."""
    if device.type == "cpu":
        return True
    if wanted is not None or device.type != "cuda":  # MPS shares the host's memory: nothing to weigh
        return wanted is not False
    return nbytes <= free(device) // 4


def _check_stride(stride: int | None, block_size: int) -> None:
    if stride is not None and stride > block_size:
        raise CharLMError(f"data.val_stride must be between 1 and block_size ({block_size}), got {stride}")


def check_unit(vocab: str, unit: str | None) -> None:
    """A CharLMError unless a model of this vocabulary reads the tokens --data.unit makes."""
    reads, given = ("bytes", "characters") if vocab == BYTE_VOCAB else ("characters", "bytes")
    if (vocab == BYTE_VOCAB) != (unit == "byte"):
        raise CharLMError(
            f"the model reads {reads}, not {given}: leave --data.unit out (the checkpoint's is used) or give "
            "the one it was trained with"
        )


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
        split: list[float] | None = None,
        unit: Literal["char", "byte"] | None = None,
        on_device: bool | None = None,
    ):
        """The corpus and its windows; for predict, the prompts (how they are continued: --generate.*).

        Args:
            path: the corpus: a file (UTF-8 text, or anything with --data.unit byte), a folder (every file
                in it, at any depth) or a glob pattern ('books/**/*.txt'), files joined in sorted order by a
                newline; `enwik8` (found or downloaded); default tiny Shakespeare ($CHARLM_DATA_DIR, the
                cache, or a download).
            block_size: characters per training and validation window; default the model's context
                (--model.block_size), or 256 for a model without one (the bigram).
            batch_size: training windows per step (per device); for predict, prompts per batch.
            val_stride: distance between validation window starts (default block_size: no overlap).
            val_batch_size: validation windows per batch (per device).
            seed: seeds the training windows (offset by the global rank, so ranks differ).
            vocab: set from the corpus or the checkpoint; not an option to give.
            prompts: predict: texts to continue (a list: '["ROMEO:", "JULIET:"]'); with neither
                prompts nor prompts_file, one empty prompt: text from a newline.
            prompts_file: predict: a UTF-8 file, one prompt per line; `-` reads them from stdin.
            num_samples: predict: continuations per prompt.
            split: the corpus's contiguous parts: training and validation ([0.9, 0.1], the default), or
                training, validation and test ([0.9, 0.05, 0.05]) for `charlm test`.
            unit: what a token is: a Unicode character of a UTF-8 file (char, the default), or a byte
                (byte: a vocabulary of all 256 values, any file, no decoding; val/bpc is then bits per byte).
                A checkpoint's unit is used unless another is given.
            on_device: keep the training split on the accelerator (windows cut there), or on the host (each
                batch gathered there and copied); default: on a GPU when it takes at most a quarter of
                its free memory.
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
        parts = DEFAULT_SPLIT if split is None else list(split)
        if len(parts) not in (2, 3) or not all(p > 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
            raise CharLMError(
                f"data.split must be 2 or 3 positive fractions that sum to 1 (training, validation[, test]), "
                f"e.g. [0.9, 0.05, 0.05]; got {split}"
            )
        if block_size is not None:  # checked now too, not only in check(): before a corpus is read
            _check_stride(val_stride, block_size)
        if val_stride is not None and val_stride < 1:
            raise CharLMError(f"data.val_stride must be between 1 and block_size, got {val_stride}")
        # The vocabulary is the model's hyperparameter. Not merged into the logger's hyperparameters either:
        # Lightning refuses a merge where data and model share a key with two values (block_size may
        # rightly be shorter here than the model's context). config.yaml records them all.
        self.save_hyperparameters(ignore=["vocab"], logger=False)
        self._vocab = vocab
        self._splits: tuple[torch.Tensor, ...] | None = None
        self._prompts: list[str] | None = None

    @property
    def vocab(self) -> str:
        """Sorted unique characters of the corpus; read lazily so `predict` never needs the corpus."""
        if self._vocab is None:
            self._load()
        return self._vocab

    def _load(self) -> None:
        files, byte = corpus_files(self.hparams.path), self.hparams.unit == "byte"
        if self._vocab is not None:
            check_unit(self._vocab, self.hparams.unit)
        if byte and len(files) == 1:  # the file is its own token file: mapped, never read in full
            size = files[0].stat().st_size
            if not size:
                raise CharLMError(f"corpus file is empty: {files[0]}")
            data = torch.from_file(str(files[0]), shared=False, size=size, dtype=torch.uint8)
            self._vocab = self._vocab or BYTE_VOCAB
        elif byte or len(files) > 1 or files[0].stat().st_size >= PREPARE_MIN_BYTES:
            vocab, data = prepared_ids(files, byte)  # encoded once, then memory-mapped (prepared.py)
            if self._vocab not in (None, vocab):  # a checkpoint's vocabulary: its ids (in memory)
                data = remap(data, vocab, self._vocab)
            self._vocab = self._vocab or vocab
        else:
            text = read_corpus(files[0])
            tok = CharTokenizer(self._vocab) if self._vocab else CharTokenizer.from_text(text)
            self._vocab = tok.vocab
            data = tok.encode(text)
        n_train, n_val, _ = self._sizes(len(data))
        self._splits = (data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :])

    @property
    def parts(self) -> list[float]:
        """The --data.split fractions: training, validation[, test]."""
        return self.hparams.split or DEFAULT_SPLIT

    def _sizes(self, n: int) -> tuple[int, int, int]:
        """Characters in training, validation and test (0 without a third fraction) of n."""
        parts = self.parts
        n_train = int(parts[0] * n)
        n_val = n - n_train if len(parts) == 2 else int(parts[1] * n)
        return n_train, n_val, n - n_train - n_val

    @property
    def block_size(self) -> int:
        """--data.block_size, else the context of the model being trained (see window_length)."""
        model = self.trainer.lightning_module if self.trainer else None
        return window_length(self.hparams.block_size, model.hparams if model else {})

    def check(self) -> None:
        """Raise a CharLMError if the windows do not fit: each split needs one window, the stride one."""
        block = self.block_size
        _check_stride(self.hparams.val_stride, block)
        train, val = self.splits
        need = block + 1
        test = self.test_split
        if min(len(train), len(val), len(test) if len(test) else need) < need:
            parts = self.parts

            def fits(n: int) -> bool:
                return all(size >= need for size in self._sizes(n)[: len(parts)])

            total = len(train) + len(val) + len(test)
            and_test = f" and {len(test)} for test" if len(test) else ""
            shortest = int(need / min(parts)) + 3  # fits; a few characters less may too (rounding)
            while fits(shortest - 1):
                shortest -= 1
            raise CharLMError(
                f"corpus too short: {total} characters split into {len(train)} for training and {len(val)} "
                f"for validation{and_test}, but one window at block_size {block} needs {need} characters in "
                f"each; use a corpus of at least {shortest} characters, a smaller --data.block_size, or "
                f"larger --data.split fractions for the short parts"
            )

    @property
    def splits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, val) ids: the first 90% and the last 10% of the corpus (--data.split), contiguous."""
        if self._splits is None:
            self._load()
        return self._splits[:2]

    @property
    def test_split(self) -> torch.Tensor:
        """The ids after the validation part; empty without a third --data.split fraction."""
        if self._splits is None:
            self._load()
        return self._splits[2]

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self.check()
            train, val = self.splits
            rank = self.trainer.global_rank if self.trainer else 0
            hp, block = self.hparams, self.block_size
            # The training split moves to the accelerator once (a few MB as uint8 ids); windows are then
            # cut there, with no host gather and copy per step. One too large for it stays mapped.
            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            if on_device(train.nbytes, device, hp.on_device):
                train = train.to(device)
            self.train_set = RandomWindows(train, block, hp.batch_size, hp.seed + rank, device)
            self.val_set = self._scored_windows(val)
        if stage == "test":
            if not len(self.test_split):
                raise CharLMError(
                    "the corpus has no test split (--data.split has two parts): train with three, e.g. "
                    "--data.split [0.9,0.05,0.05] (training, validation, test), and test that model; "
                    "`charlm validate` scores the validation part"
                )
            self.check()
            self.test_set = self._scored_windows(self.test_split)

    def train_dataloader(self) -> RandomWindows:
        # The iterable itself, not a DataLoader around it: Lightning saves and restores the state of the
        # loaders it is given, and a DataLoader has none. Batches are already whole, so no workers are needed.
        return self.train_set

    def val_dataloader(self) -> DataLoader:
        return self._scored_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._scored_loader(self.test_set)

    def _scored_windows(self, split: torch.Tensor) -> StridedWindows:
        return StridedWindows(split, self.block_size, self.hparams.val_stride or self.block_size)

    def _scored_loader(self, windows: StridedWindows) -> DataLoader:
        # A private generator: a DataLoader draws a base seed from the global RNG at every iter(), and
        # validation must not move the RNG that dropout uses, or resumed runs would drift.
        loader_rng = torch.Generator().manual_seed(0)
        return DataLoader(self._shard(windows), batch_size=self.hparams.val_batch_size, generator=loader_rng)

    def _shard(self, dataset: Dataset) -> Dataset:
        """This rank's share, every `world_size`-th item: no duplicates and no padding (Lightning's sampler
        pads, which would count some windows twice), so metrics synced over ranks equal one process's."""
        world = self.trainer.world_size if self.trainer else 1
        if world == 1:
            return dataset
        if isinstance(dataset, Prompts) and len(dataset) < world:  # Lightning fails an idle rank's loader
            raise CharLMError(
                f"{len(dataset)} prompts (num_samples copies included) for {world} processes: each needs one "
                "at least; give more prompts or --data.num_samples, or fewer --trainer.devices"
            )
        return Subset(dataset, range(self.trainer.global_rank, len(dataset), world))

    def prompt_list(self) -> list[str]:
        """Every prompt, each num_samples times; read once (stdin can be read only once)."""
        if self._prompts is not None:
            return self._prompts
        hp = self.hparams
        if hp.prompts == [] and not hp.prompts_file:
            raise CharLMError("--data.prompts is empty: give at least one prompt, or leave it out")
        prompts = list(hp.prompts or [])
        if hp.prompts_file == "-":
            if sys.stdin.isatty():  # typed, not piped: say how to end them
                print(
                    "charlm: reading prompts from the terminal, one per line; end with Ctrl-D",
                    file=sys.stderr,
                )
            lines = sys.stdin.read().removeprefix("\ufeff").splitlines()  # a BOM is not part of a prompt
            if not lines:
                raise CharLMError("--data.prompts_file -: stdin held no prompts (one per line)")
            prompts += lines
        elif hp.prompts_file:
            path = Path(hp.prompts_file)
            if path.is_dir():
                raise CharLMError(f"prompts file {path} is a directory: name a file, one prompt per line")
            if not path.is_file():
                raise CharLMError(f"prompts file not found: {path}")
            try:
                lines = path.read_text(encoding="utf-8-sig").splitlines()  # without a BOM (Windows editors)
            except UnicodeDecodeError as err:
                raise CharLMError(
                    f"prompts file {path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset "
                    f"{err.start}"
                ) from None
            if not lines:  # an empty line is an empty prompt; an empty file is likely a mistake
                raise CharLMError(f"prompts file {path} is empty: one prompt per line")
            prompts += lines
        self._prompts = [p for p in (prompts or [""]) for _ in range(hp.num_samples)]
        return self._prompts

    def predict_dataloader(self) -> DataLoader:
        # Batches of (prompt, sample) pairs: the LightningModule encodes the prompts with its own
        # (checkpoint) vocabulary.
        return DataLoader(
            self._shard(Prompts(self.prompt_list())), batch_size=self.hparams.batch_size, collate_fn=list
        )
