"""PredictionWriter: where `charlm predict` puts its continuations (stdout, and a file if asked), as text or
as JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_charlm.errors import CharLMError

# Control characters a model may generate (bytes models especially), shown as U+FFFD on a terminal: an ESC
# sequence would act on the terminal, not be seen. Files and pipes get the text as it is.
_CONTROLS = {c: "\ufffd" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}
# What a predict stopped by a signal wrote, for main()'s one closing line (Lightning's bar is still live when
# the writer learns it: a line logged then lands inside the bar).
WRITTEN_ON_SIGNAL: list[str] = []


def terminal_safe(text: str) -> str:
    return text.translate(_CONTROLS)


class PredictionWriter(BasePredictionWriter):
    """Where predictions go: each prompt and its continuation are printed, and written to `output` if given.

    An existing file is replaced only with `overwrite` (a mistyped `--writer.output best.ckpt` must not cost
    a checkpoint); that, and whether the file can be written, are checked before anything is generated. The
    file is written as `output.tmp` and renamed when prediction ends, so a failed run (a bad prompt, say)
    leaves an earlier file as it was.
    """

    def __init__(
        self, output: str | None = None, overwrite: bool = False, format: Literal["text", "jsonl"] = "text"
    ):
        """Where predict's output goes.

        Args:
            output: also write the predictions to this file (under DDP one per rank: NAME.rank0.txt, ...).
            overwrite: replace `output` if it exists (otherwise that is an error, checked before generating).
            format: text (prompt + continuation, a blank line between records) or jsonl (one JSON object per
                record: prompt, text, seed and the generation settings), for stdout and `output` alike.
        """
        super().__init__(write_interval="batch")
        if output is not None and not output.strip():
            raise CharLMError("--writer.output is empty: name a file, or leave it out to print only")
        self.output, self.overwrite, self.format = output, overwrite, format

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict" or self.output is None:
            return
        path = self.path(trainer)
        if path.is_dir():
            raise CharLMError(f"--writer.output {path} is a directory: name a file")
        if path.exists() and not self.overwrite:
            raise CharLMError(
                f"--writer.output {path} already exists: pass --writer.overwrite true to replace it, or name "
                "another file"
            )
        try:  # fail now, not after generating: a missing parent is made, a file in the way is an error
            self._tmp(trainer).parent.mkdir(parents=True, exist_ok=True)
            self._tmp(trainer).write_text("", encoding="utf-8")
        except OSError as err:
            raise CharLMError(f"cannot write --writer.output {path}: {err.strerror or err}") from None

    def path(self, trainer: L.Trainer) -> Path:
        p = Path(self.output)
        return p if trainer.world_size == 1 else p.with_name(f"{p.stem}.rank{trainer.global_rank}{p.suffix}")

    def _tmp(self, trainer: L.Trainer) -> Path:
        return self.path(trainer).with_name(self.path(trainer).name + ".tmp")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # SIGTERM or Ctrl-C: generation stops at the next token, and what was generated is written. A second
        # Ctrl-C interrupts at once.
        def on_signal(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            pl_module.interrupted.set()

        self._handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.written = 0
        # One prompt, text format, a person at a terminal: the module prints characters as they come.
        dm = trainer.datamodule
        one = dm is not None and len(dm.prompt_list()) == 1 and trainer.world_size == 1
        self.streaming = one and self.format == "text" and sys.stdout.isatty()
        if self.streaming:
            pl_module.stream_to = lambda piece: print(terminal_safe(piece), end="", flush=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        if self.format == "jsonl":  # one line per record, whatever the text holds
            records = [json.dumps(record, ensure_ascii=False) + "\n" for record in prediction]
        else:  # readable; a text with blank lines of its own cannot be split apart again (use jsonl)
            records = [f"{record['prompt']}{record['text']}\n\n" for record in prediction]
        shown = "".join(records)
        print(
            "\n\n" if self.streaming else terminal_safe(shown) if sys.stdout.isatty() else shown,
            end="",
            flush=True,
        )
        if self.output is not None:
            with self._tmp(trainer).open("a", encoding="utf-8") as f:
                f.writelines(records)
        self.written += len(records)
        if pl_module.interrupted.is_set():
            self.on_predict_end(trainer, pl_module)
            where = f" to {self.path(trainer)}" if self.output is not None else ""
            cut = "the last" if len(records) == 1 else f"the last {len(records)}, one batch,"
            WRITTEN_ON_SIGNAL.append(
                f"{self.written} continuation{'s' * (self.written != 1)} ({cut} cut short) written{where}"
            )
            raise SIGTERMException

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.output is not None:
            os.replace(self._tmp(trainer), self.path(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.stream_to = None
        for signum, handler in getattr(self, "_handlers", {}).items():
            signal.signal(signum, handler)
        self._handlers = {}

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.predicting and self.output is not None:
            with contextlib.suppress(OSError):  # the path may never have been writable (that error is shown)
                self._tmp(trainer).unlink(missing_ok=True)
