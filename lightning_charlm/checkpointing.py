"""Checkpoints that never lose a good file: the Checkpoint callback (best only improves, non-finite
runs never saved, periodic and on-signal last.ckpt) and the background writer it installs."""

from __future__ import annotations

import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_charlm.errors import CharLMError

# (step, path) of each last.ckpt written because a signal stopped training: the run's closing line names it.
SAVED_ON_SIGNAL: list[tuple[int, str]] = []


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that never leaves a half-written file and loses at most `last_every_n_steps` steps.

    - Nothing is saved once the loss or the weights are non-finite: the run stops with a CharLMError instead.
    - Files are written by BackgroundCheckpointIO (below): in a background thread, to `NAME.tmp`, then renamed
      over `NAME`, so training goes on meanwhile and a kill mid-write keeps the old file.
    - `last.ckpt` is also written every `last_every_n_steps` optimizer steps, not only at validation.
    - SIGTERM and the first Ctrl-C stop the run after the step in progress and write `last.ckpt`; Lightning
      turns SIGTERM into a SIGTERMException at the end of a whole step, and SIGINT is routed the same way.
      A second Ctrl-C interrupts at once.
    """

    def __init__(self, *args: Any, last_every_n_steps: int | None = 100, **kwargs: Any):
        """Lightning's ModelCheckpoint, with best.ckpt and last.ckpt set by charlm.

        Args:
            last_every_n_steps: write last.ckpt every this many optimizer steps too (None: validation only).
        """
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

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:
        """Lightning warns when the checkpoint folder holds files: here that only happens on a resume into
        the run's own folder, which is the point (a new run always gets a new version_N)."""

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
        # On a CPU the flag is read at no cost: a nan loss stops the run at once, not up to a logging step on
        # (where the bar would show `loss: nan` meanwhile). The weights are checked at logging steps. Under
        # DDP every rank checks at the same steps, so that all stop together (a rank's loss turns nan a step
        # after another's, through the averaged gradients: the first to stop would leave the rest waiting).
        alone_on_cpu = trainer.world_size == 1 and pl_module.device.type == "cpu"
        logging_step = trainer.global_step % trainer.log_every_n_steps == 0
        if logging_step or (alone_on_cpu and int(self._bad_step) >= 0):
            self._raise_if_nonfinite(trainer)
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # so Lightning validates at the final step too: best.ckpt and val/loss
        super().on_train_batch_end(trainer, pl_module, outputs, *args)
        n, step = self.last_every_n_steps, trainer.global_step
        if self.save_last and n and step % n == 0 and step != self._last_periodic_step:
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # ModelCheckpoint skips validation-time saves at a step it already saved: keep best.ckpt possible.
            self._last_global_step_saved, self._last_periodic_step = saved, step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # a round is complete: its run-long counters agree again
            # After a round stopped part-way is run again (_as_if_validation_not_begun), Lightning levels only
            # the current round's counters: the run-long ones would stay a batch ahead in every later
            # checkpoint, and a resume at a validation step would take that for a round stopped part-way.
            total = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total
            total.ready = total.started = total.processed = total.completed
        super().on_validation_end(trainer, pl_module)
        best = self.best_model_score
        if trainer.logger is not None and best is not None and not trainer.sanity_checking:
            # The metric of TensorBoard's HParams tab (callbacks.RunSummary writes the hyperparameters).
            # At val/loss's step index (Lightning logs a validation at step - 1).
            trainer.logger.log_metrics({"hp/best_val_loss": float(best)}, trainer.global_step - 1)
        # Lightning 2.6 writes last.ckpt at a validation only when best.ckpt was written too: write it at
        # every validation, so a run that stops without improving (early stopping) keeps its latest state.
        self._save_last_if_due(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_if_due(trainer)  # the final step, when it fell between validations and periodic saves

    def _save_last_if_due(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sigterm = signal.getsignal(signal.SIGTERM)  # Lightning's handler: sets trainer.received_sigterm
        if callable(sigterm):

            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
                rank_zero_info(
                    "\ncharlm: stopping after this step and saving last.ckpt (Ctrl-C again to abort)"
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
        # Only training has a state to keep (a signal during validate, test or predict saves nothing).
        if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == "fit":
            if trainer.validating:
                _as_if_validation_not_begun(trainer.fit_loop.epoch_loop.val_loop.batch_progress)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            SAVED_ON_SIGNAL.append((trainer.global_step, self.last_model_path))  # cli.main says so, once
        else:  # a crash or a non-finite loss: never overwrite good checkpoints with its state
            super().on_exception(trainer, pl_module, exception)


def _as_if_validation_not_begun(progress) -> None:
    """Rewinds a validation round stopped part-way to "its first batch fetched, none scored". Resumed from
    the state as it was, Lightning would skip the round (its curve would lack that point, best.ckpt would
    miss that step) or finish only its remaining batches (an inexact val/loss); from this one, Lightning's
    restarted-mid-evaluation path runs the round again from its first batch."""
    before = progress.total.completed - progress.current.completed  # batches of earlier rounds
    for counts, done in ((progress.total, before), (progress.current, 0)):
        counts.ready = counts.started = done + 1
        counts.processed = counts.completed = done


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
