"""Side jobs only: safe checkpoints, throughput, SampleText (periodic samples), the prediction writer."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_charlm.errors import CharLMError
from lightning_charlm.runs import BackgroundCheckpointIO
from lightning_charlm.sampling import MAX_NEW_TOKENS, check_settings


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that never leaves a half-written file and loses at most `last_every_n_steps` steps.

    - Nothing is saved once the loss or the weights are non-finite: the run stops with a CharLMError instead.
    - Files are written by runs.BackgroundCheckpointIO: in a background thread, to `NAME.tmp`, then renamed
      over `NAME`, so training goes on meanwhile and a kill mid-write keeps the old file.
    - `last.ckpt` is also written every `last_every_n_steps` optimizer steps, not only at validation.
    - SIGTERM and the first Ctrl-C stop the run after the step in progress and write `last.ckpt`; Lightning
      turns SIGTERM into a SIGTERMException at the end of a whole step, and SIGINT is routed the same way.
      A second Ctrl-C interrupts at once.
    """

    def __init__(self, *args: Any, last_every_n_steps: int | None = 100, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.last_every_n_steps = last_every_n_steps
        self._last_periodic_step = -1  # with gradient accumulation several batches end on one step
        self._sigint_handler: Any = None
        self._bad_step: torch.Tensor | None = None

    def _raise_if_nonfinite(self, trainer: L.Trainer) -> None:
        """Stop before a checkpoint could hold NaN/inf weights (one device sync, so only now and then)."""
        step = int(self._bad_step) if self._bad_step is not None else -1
        params = list(trainer.lightning_module.parameters())
        if step < 0 and not torch.stack([p.isfinite().all() for p in params]).all():
            step = trainer.global_step
        if step >= 0:
            raise CharLMError(
                f"the training loss or weights became non-finite (nan or inf) at step {step}; the run is "
                "stopped and the checkpoints written before are kept as they were. Try a lower --model.lr, "
                "more --model.warmup_steps or 32-bit precision."
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a user's own is kept
            trainer.strategy.checkpoint_io = BackgroundCheckpointIO()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the best score only when the saved dirpath string equals the current one. From
        # another working directory, or with an absolute save_dir, the strings differ, the score is dropped,
        # and the next validation would replace best.ckpt whatever its loss. A resumed run writes into the
        # folder its checkpoint came from (runs.continue_run), so its state is this folder's: restore it
        # all, with the stored file paths moved into this folder (Lightning deletes superseded top-k files
        # by those paths, so they must name files here).
        saved, here = state_dict.get("dirpath"), self.dirpath
        if saved is not None and here is not None and saved != here:

            def moved(path: str | None) -> str | None:
                return os.path.join(here, os.path.basename(path)) if path else path

            state_dict = dict(state_dict, dirpath=here)
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state_dict[key] = moved(state_dict.get(key))
            state_dict["best_k_models"] = {
                moved(k): v for k, v in state_dict.get("best_k_models", {}).items()
            }
        super().load_state_dict(state_dict)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._raise_if_nonfinite(trainer)
        super()._save_checkpoint(trainer, filepath)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args: Any
    ) -> None:
        # Remember the first step with a non-finite loss on the device, without a sync every step.
        loss = outputs["loss"].detach() if isinstance(outputs, dict) else outputs.detach()
        current = torch.full_like(loss, trainer.global_step)
        if self._bad_step is None:
            self._bad_step = torch.full_like(loss, -1)
        self._bad_step = torch.where(~loss.isfinite() & (self._bad_step < 0), current, self._bad_step)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._raise_if_nonfinite(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, *args)
        n, step = self.last_every_n_steps, trainer.global_step
        if self.save_last and n and step % n == 0 and step != self._last_periodic_step:
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # ModelCheckpoint skips validation-time saves at a step it already saved: keep best.ckpt possible.
            self._last_global_step_saved, self._last_periodic_step = saved, step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sigterm = signal.getsignal(signal.SIGTERM)  # Lightning's handler: sets trainer.received_sigterm
        if callable(sigterm):

            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
                rank_zero_info(
                    "\nCtrl-C: stopping after this step and saving last.ckpt (Ctrl-C again to abort)"
                )
                sigterm(signum, frame)

            self._sigint_handler = signal.signal(signal.SIGINT, on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sigint_handler is not None:
            signal.signal(signal.SIGINT, self._sigint_handler)
            self._sigint_handler = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"Stopped by a signal at step {trainer.global_step}; saved {self.last_model_path}")
        else:  # a crash or a non-finite loss: never overwrite good checkpoints with its state
            super().on_exception(trainer, pl_module, exception)


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
            if trainer.logger is not None and trainer.is_global_zero:
                trainer.logger.log_metrics({"train/tokens_per_s": rate}, step)
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
        if every_n_steps < 1 or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise CharLMError(
                "sample.every_n_steps must be >= 1 and sample.max_new_tokens between 1 and "
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
        due = step and step % self.every_n_steps == 0 and step != self._last_step  # not before a step
        if not due or not (trainer.is_global_zero or sharded):
            return
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
            self._tmp(trainer).unlink(missing_ok=True)
