"""Side jobs only: throughput, the progress bar, SampleText (periodic samples), the prediction writer.
(The Checkpoint callback lives in checkpointing.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_charlm.errors import CharLMError
from lightning_charlm.sampling import MAX_NEW_TOKENS, check_settings


class TokensPerSecond(L.Callback):
    """Training throughput, all ranks together, as `train/tokens_per_s` in the progress bar and TensorBoard.

    Timed over windows of `every_n_steps` steps with one device sync per window; Lightning's
    ThroughputMonitor syncs at every step, which costs GPU time. The first window includes warm-up.
    """

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self._t0: float | None = None
        self._tokens, self._last_step = 0, -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args
    ) -> None:
        self._tokens += batch[0].numel() * trainer.world_size
        step = trainer.global_step
        if self._t0 is not None and (step % self.every_n_steps or step == self._last_step):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._t0 is not None:
            rate = self._tokens / (now - self._t0)
            pl_module.log("train/tokens_per_s", rate, prog_bar=True, logger=False)
            if trainer.logger is not None and trainer.is_global_zero:  # at the step index train/loss gets
                trainer.logger.log_metrics({"train/tokens_per_s": rate}, step - 1)
        self._t0, self._tokens, self._last_step = now, 0, step


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, labelled for step-based training: one endless epoch would read "Epoch 0/-2",
    and the run's version number would show as a float metric."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "train steps"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, Any] | None = None
        self._read_at = 0.0

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # Turning the logged tensors into numbers waits for the GPU to finish, which would stall the
        # pipeline at every step: read them at most twice a second (and after every validation).
        now = time.monotonic()
        if self._metrics is None or now - self._read_at >= 0.5:
            self._metrics = super().get_metrics(trainer, pl_module)
            self._metrics.pop("v_num", None)
            if getattr(pl_module, "last_train_loss", None) is not None:  # logged only now and then
                self._metrics["train/loss"] = pl_module.last_train_loss.item()
            self._read_at = now
        return self._metrics

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metrics = None
        super().on_validation_end(trainer, pl_module)


class SampleText(L.Callback):
    """Every `every_n_steps` optimizer steps, rank 0 samples `max_new_tokens` characters and logs them.

    Sampling uses a private generator seeded from `seed` and the step, so the training RNG is untouched and
    samples are reproducible; the shared loop switches to eval mode and back. Under DDP no collective op
    runs, so the other ranks never wait on rank 0; under FSDP all ranks join (see on_train_batch_end).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        prompt: str = "",
        seed: int = 0,
    ):
        if every_n_steps < 0 or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise CharLMError(
                "sample.every_n_steps must be >= 0 (0: no samples) and sample.max_new_tokens between 1 and "
                f"{MAX_NEW_TOKENS:,}"
            )
        check_settings(temperature, top_k, None)
        self.every_n_steps, self.max_new_tokens = every_n_steps, max_new_tokens
        self.temperature, self.top_k, self.prompt, self.seed = temperature, top_k, prompt, seed
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # Under FSDP each rank holds a shard of the weights: every rank gathers them (a collective) and
        # generates the same text; elsewhere rank 0 alone generates, and the others never wait on it.
        sharded = isinstance(trainer.model, FullyShardedDataParallel)
        every = self.every_n_steps  # 0: no samples
        due = every and step and step % every == 0 and step != self._last_step  # not before a step
        if not due or not (trainer.is_global_zero or sharded):
            return
        if not all(p.isfinite().all() for p in pl_module.parameters()):
            return  # a diverged model cannot be sampled; the Checkpoint callback stops the run with a message
        self._last_step = step  # with gradient accumulation several batches end on one step
        full = FullyShardedDataParallel.summon_full_params if sharded else None
        with full(trainer.model, writeback=False) if full else contextlib.nullcontext():
            text = pl_module.generate(
                [self.prompt],
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                seed=self.seed + step,
            )[0]
        if not trainer.is_global_zero:
            return
        rank_zero_info(f"\n--- sample at step {step} ---\n{self.prompt}{text}\n---")
        if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_text"):
            # Markdown: indent by 4 so TensorBoard keeps newlines and spacing.
            shown = "\n".join("    " + line for line in (self.prompt + text).splitlines())
            trainer.logger.experiment.add_text("samples", shown, step)


class PredictionWriter(BasePredictionWriter):
    """Prints each prompt and its continuation, and with `output` also writes them to that file (one per
    rank: `NAME.rank1.txt`, ...).

    An existing file is replaced only with `overwrite` (a mistyped `--writer.output best.ckpt` must not cost
    a checkpoint); that, and whether the file can be written, are checked before anything is generated. The
    file is written as `output.tmp` and renamed when prediction ends, so a failed run (a bad prompt, say)
    leaves an earlier file as it was.
    """

    def __init__(self, output: str | None = None, overwrite: bool = False):
        super().__init__(write_interval="batch")
        if output is not None and not output.strip():
            raise CharLMError("--writer.output is empty: name a file, or leave it out to print only")
        self.output, self.overwrite = output, overwrite

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

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        records = [f"{prompt}{text}\n" for prompt, text in prediction]
        for record in records:
            print(record, flush=True)
        if self.output is not None:
            with self._tmp(trainer).open("a", encoding="utf-8") as f:
                f.writelines(record + "\n" for record in records)
        self.written += len(records)
        if pl_module.interrupted.is_set():
            self.on_predict_end(trainer, pl_module)
            where = f" to {self.path(trainer)}" if self.output is not None else ""
            rank_zero_info(
                f"Stopped by a signal: {self.written} continuations (the last cut short) written{where}"
            )
            raise SIGTERMException

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.output is not None:
            os.replace(self._tmp(trainer), self.path(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in getattr(self, "_handlers", {}).items():
            signal.signal(signum, handler)
        self._handlers = {}

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.predicting and self.output is not None:
            with contextlib.suppress(OSError):  # the path may never have been writable (that error is shown)
                self._tmp(trainer).unlink(missing_ok=True)
