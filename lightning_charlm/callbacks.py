"""Side jobs only: throughput, the progress bar, SampleText (periodic samples), the run summary.
(The Checkpoint callback lives in checkpointing.py, the prediction writer in writer.py.)"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, RichProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from rich.progress import ProgressColumn, Task
from rich.text import Text
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_charlm.console import say
from lightning_charlm.corpus import TINY_SHAKESPEARE, is_pattern
from lightning_charlm.errors import CharLMError
from lightning_charlm.tokenizer import ByteTokenizer


class TokensPerSecond(L.Callback):
    """Training throughput, all ranks together, as `train/tokens_per_s` in the progress bar and TensorBoard.

    Written to TensorBoard over windows of `every_n_steps` steps (and the last step's), with one device
    sync per window on a GPU; Lightning's ThroughputMonitor syncs at every step, which costs GPU time. The
    first window includes warm-up. The bar reads `rate` from here: a value logged with prog_bar=True becomes
    a device tensor that Lightning turns back into a number (.item(), a sync) at the end of every step (on
    an H100: 0.87x of a plain loop). Where the host's clock is the device's (CPU, and MPS), `rate` is renewed
    every BAR_EVERY steps, so a slow CPU run shows one within seconds; on CUDA, at the sync of each window.
    """

    BAR_EVERY = 5

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self.rate: float | None = None
        self._t0: float | None = None  # the window written to TensorBoard
        self._bar_t0: float | None = None  # the window of `rate`
        self._tokens, self._bar_tokens, self._last_step = 0, 0, -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args
    ) -> None:
        tokens = batch[0].numel() * trainer.world_size
        self._tokens, self._bar_tokens = self._tokens + tokens, self._bar_tokens + tokens
        step, cuda = trainer.global_step, pl_module.device.type == "cuda"
        # ... and the last step's (partial) window, so a run shorter than one window logs its rate too.
        window_end = step % self.every_n_steps == 0 or 0 < trainer.max_steps <= step
        if step == self._last_step or not (
            window_end or self._t0 is None or (not cuda and step % self.BAR_EVERY == 0)
        ):
            return
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._bar_t0 is not None:
            self.rate = self._bar_tokens / (now - self._bar_t0)
        self._bar_t0, self._bar_tokens, self._last_step = now, 0, step
        if self._t0 is None or window_end:
            if self._t0 is not None and trainer.logger is not None and trainer.is_global_zero:
                # At the step index train/loss gets.
                trainer.logger.log_metrics({"train/tokens_per_s": self._tokens / (now - self._t0)}, step - 1)
            self._t0, self._tokens = now, 0


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps to max_steps (one endless epoch would read "Epoch 0/-2",
    and a resumed run "307/93"), in one line of an 80-column terminal: short metric names, no it/s column
    (tok/s says more), a shorter bar."""

    SHORT = {"train/loss": "loss", "val/loss": "val", "train/tokens_per_s": "tok/s"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, Any] | None = None
        self._read_at = 0.0

    def _get_train_description(self, current_epoch: int) -> str:
        return "steps"

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")

    def configure_columns(self, trainer: L.Trainer) -> list:
        description, bar, count, _times, _speed = super().configure_columns(trainer)
        bar.bar_width = 12
        return [description, bar, count, ElapsedAndLeft(style=self.theme.time)]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        # Steps done, not batches of this process: right after a resume and with gradient accumulation.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # Turning the logged tensors into numbers waits for the GPU to finish, which would stall the
        # pipeline at every step: read them at most twice a second (and after every validation).
        now = time.monotonic()
        if self._metrics is None or now - self._read_at >= 0.5:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            if getattr(pl_module, "last_train_loss", None) is not None:  # logged only now and then
                metrics["train/loss"] = pl_module.last_train_loss.item()
            rates = [c.rate for c in trainer.callbacks if isinstance(c, TokensPerSecond) and c.rate]
            if rates:
                metrics["train/tokens_per_s"] = rates[0]
            self._metrics = {
                self.SHORT.get(k, k): _short(k, v) for k, v in sorted(metrics.items(), key=self._order)
            }
            self._read_at = now
        return self._metrics

    def _order(self, item: tuple[str, Any]) -> int:
        return list(self.SHORT).index(item[0]) if item[0] in self.SHORT else len(self.SHORT)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metrics = None
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning stops the live bar at teardown, after on_fit_end: RunSummary's closing line would print
        # above the bar's final state. Stopped here, the bar's last line comes first.
        self._stop_progress()

    # predict counts characters, not batches: one batch of many prompts can take minutes.
    @property
    def predict_description(self) -> str:
        return "characters"

    @property
    def total_predict_batches_current_dataloader(self) -> int:
        loader = self.trainer.predict_dataloaders
        prompts = sum(len(d.dataset) for d in (loader if isinstance(loader, list) else [loader]))
        return prompts * self.trainer.lightning_module.generation.max_new_tokens

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._prompts, self._chars, self._shown_at = 0, 0, 0.0
        pl_module.progress_to = self._generated

    def _generated(self, characters: int) -> None:
        """Called by the module after each token step; the bar is redrawn at most 5 times a second."""
        self._chars += characters
        if time.monotonic() - self._shown_at >= 0.2:
            self._update(self.predict_progress_bar_id, self._chars)
            self._shown_at = time.monotonic()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # Every prompt of the batch done, those a stop string ended early included; a batch a signal cut
        # short keeps the count it reached (the bar must not say 100% of what was never generated).
        self._prompts += len(batch)
        if not pl_module.interrupted.is_set():
            self._chars = self._prompts * pl_module.generation.max_new_tokens
        self._update(self.predict_progress_bar_id, self._chars)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.progress_to = None
        super().on_predict_end(trainer, pl_module)


class ElapsedAndLeft(ProgressColumn):
    """`1:28<2:16` (elapsed < remaining), as tqdm writes it: half the width of Lightning's time column."""

    def __init__(self, style: Any):
        super().__init__()
        self.style = style

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        return Text(f"{_clock(task.elapsed)}<{'?' if left is None else _clock(left)}", style=self.style)


def _clock(seconds: float | None) -> str:
    minutes, secs = divmod(int(seconds or 0), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _short(key: str, value: Any) -> Any:
    """3 decimals for a loss; tokens/s as 946, 5.6k or 1.23M."""
    if isinstance(value, int | float) and abs(value) >= 1000:
        return f"{value / 1e6:.2f}M" if abs(value) >= 1e6 else f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if key == "train/tokens_per_s" else value


class SampleText(L.Callback):
    """Samples during training: every `every_n_steps` steps, a continuation of `prompt`, printed and logged.

    The settings are the run's --generate.* ones.
    Sampling uses a private generator seeded from --generate.seed (or 0) plus the step, so the training RNG
    is untouched and samples are reproducible; the shared loop switches to eval mode and back. Under DDP no
    collective op runs, so the other ranks never wait on rank 0; under FSDP all ranks join (see
    on_train_batch_end).
    """

    def __init__(self, every_n_steps: int = 500, prompt: str = ""):
        """Periodic samples during training; how they are generated is --generate.*.

        Args:
            every_n_steps: optimizer steps between samples; 0 turns them off.
            prompt: the text each sample continues.
        """
        if every_n_steps < 0:
            raise CharLMError("sample.every_n_steps must be >= 0 (0: no samples)")
        self.every_n_steps, self.prompt = every_n_steps, prompt
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
            # Eager: samples are rare, and a compiled step would cost seconds of training time to compile.
            settings = replace(
                pl_module.generation, seed=(pl_module.generation.seed or 0) + step, compile=False
            )
            text = pl_module.generate([self.prompt], settings)[0]
        if not trainer.is_global_zero:
            return
        rank_zero_info(f"\n--- sample at step {step} ---\n{self.prompt}{text}\n---")
        if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_text"):
            # Markdown: indent by 4 so TensorBoard keeps newlines and spacing.
            shown = "\n".join("    " + line for line in (self.prompt + text).splitlines())
            trainer.logger.experiment.add_text("samples", shown, step)


# Parameters above which a run on a CPU gets a note pointing to gpt-cpu.yaml: the default GPT with 2 layers
# (3.6M) showed an ETA of ~20 h on the 2-core test machine.
CPU_SIZED = 2_000_000


class RunSummary(L.Callback):
    """What a run is, in one line at its start; its best val/loss and best.ckpt in one line at its end; and
    TensorBoard's HParams tab: the run's key settings, with `hp/best_val_loss` to compare runs by."""

    _end = None  # the HParams tab's "session end" summary, written when training completes

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params = self._params(trainer, pl_module)
        line = self._line(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if not trainer.is_global_zero:
            return
        say(f"charlm: {line}")
        if trainer.strategy.root_device.type == "cpu" and self.params["parameters"] > CPU_SIZED:
            say(
                f"charlm: note: {self.params['parameters'] / 1e6:.1f}M parameters is a model for a GPU: on a "
                "CPU each step takes seconds; configs/gpt-cpu.yaml is sized for one"
            )
        logger = trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            return
        # The plugin's session summaries (TensorBoardLogger.log_hyperparams would also write a value at step
        # 0), without its "experiment" summary: TensorBoard shows the columns of the first one it finds, so a
        # bigram run beside GPT runs hid every GPT column; without one it shows every run's hyperparameters,
        # and every scalar's last value (hp/best_val_loss, from the Checkpoint callback, among them).
        from torch.utils.tensorboard.summary import hparams

        _, start, self._end = hparams(self.params, {"hp/best_val_loss": 0.0})
        logger.experiment._get_file_writer().add_summary(start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # "Success" only once training ran to its end (not on a signal, not on a crash): TensorBoard keeps a
        # run's first status, and a run stopped here and resumed into the same folder ends there later.
        if self._end is not None and trainer.is_global_zero:
            trainer.logger.experiment._get_file_writer().add_summary(self._end)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if not trainer.is_global_zero:
            return
        step, steps = trainer.global_step, trainer.max_steps
        if (why := _stopped_early(trainer.early_stopping_callback)) and step < steps:
            say(f"charlm: stopped early at step {step} of {steps}: {why}")
        if ckpt is not None and ckpt.best_model_score is not None:
            say(f"charlm: best val/loss {ckpt.best_model_score:.4f}: {ckpt.best_model_path}")

    @staticmethod
    def _params(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        hp, dm = pl_module.hparams, trainer.datamodule
        shape = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
        recipe = ("positions", "norm", "mlp", "qk_norm", "zero_init", "tie_head", "optimizer")  # ablated
        # Flags as words: TensorBoard shows a bool as 1 or 0. A bigram's block_size: the windows it trains on.
        model = {
            k: str(hp[k]).lower() if isinstance(hp[k], bool) else hp[k] for k in (*shape, *recipe) if k in hp
        }
        model.setdefault("block_size", dm.block_size)
        return {
            "model": type(pl_module).__name__,
            **model,
            **{k: hp[k] for k in ("lr", "min_lr", "warmup_steps", "weight_decay", "label_smoothing")},
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "batch_size": dm.hparams.batch_size * trainer.world_size * trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "corpus": _corpus_name(dm.hparams.path),
            "vocab_size": len(pl_module.tokenizer),
            "unit": "byte" if isinstance(pl_module.tokenizer, ByteTokenizer) else "char",
        }

    def _line(self, trainer: L.Trainer) -> str:
        p, device = self.params, trainer.strategy.root_device.type
        layers = f"{p.get('n_layer')} layer{'s' * (p.get('n_layer') != 1)}"
        shape = f" {layers} x {p['n_embd']}, block {p['block_size']}," if "n_layer" in p else ""
        devices = f"{trainer.world_size} x {device}" if trainer.world_size > 1 else device
        ckpt = trainer.checkpoint_callback
        where = f" -> {trainer.log_dir}" if trainer.logger is not None else " (no logger)"
        in_run = ckpt is None or (
            trainer.logger is not None
            and Path(ckpt.dirpath).resolve().parent == Path(trainer.log_dir).resolve()
        )
        if not in_run:
            where += f"; checkpoints -> {os.path.relpath(ckpt.dirpath)}"  # not the run folder's own
        resumed = f", resuming at step {trainer.global_step}" if trainer.ckpt_path else ""
        return (
            f"{p['model']}{shape} {p['parameters']:,} parameters on {devices} ({p['precision']}); "
            f"{p['corpus']}, {p['vocab_size']} {'byte values' if p['unit'] == 'byte' else 'characters'}"
            f"{resumed}{where}"
        )


def _stopped_early(stopper: EarlyStopping | None) -> str | None:
    """Why early stopping ended the run, in the words of its options; None if it did not."""
    if stopper is None:
        return None
    m, reason = stopper.monitor, stopper.stopping_reason
    if reason == EarlyStoppingReason.STOPPING_THRESHOLD:
        return f"{m} reached {stopper.stopping_threshold} (--early_stopping.stopping_threshold)"
    if reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD:
        return f"{m} passed {stopper.divergence_threshold} (--early_stopping.divergence_threshold)"
    if stopper.wait_count >= stopper.patience:  # the reason a resumed run reads back may be an earlier stop's
        by = f" by more than {abs(stopper.min_delta)}" if stopper.min_delta else ""
        return f"{m} did not improve{by} for {stopper.patience} validations (--early_stopping.patience)"
    return None


def _corpus_name(path: str | None) -> str:
    """The file's (or folder's) name; a glob pattern whole (its last part alone would say little)."""
    if path is None:
        return TINY_SHAKESPEARE
    return str(path) if is_pattern(path) else Path(path).name
