"""Side jobs only: SampleText (periodic samples to stdout and TensorBoard) and the prediction writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class SampleText(L.Callback):
    """Every `every_n_steps` optimizer steps, rank 0 samples `max_new_tokens` characters and logs them.

    Sampling uses a private generator seeded from `seed` and the step, so the training RNG is untouched and
    samples are reproducible; the shared loop switches to eval mode and back. No collective op runs, so the
    other DDP ranks never wait on rank 0.
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
        if every_n_steps < 1 or max_new_tokens < 1:
            raise ValueError("sample.every_n_steps and sample.max_new_tokens must be >= 1")
        self.every_n_steps, self.max_new_tokens = every_n_steps, max_new_tokens
        self.temperature, self.top_k, self.prompt, self.seed = temperature, top_k, prompt, seed
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step  # with gradient accumulation several batches end on one step
        text = pl_module.generate(
            [self.prompt],
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed + step,
        )[0]
        rank_zero_info(f"\n--- sample at step {step} ---\n{self.prompt}{text}\n---")
        if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_text"):
            # Markdown: indent by 4 so TensorBoard keeps newlines and spacing.
            shown = "\n".join("    " + line for line in (self.prompt + text).splitlines())
            trainer.logger.experiment.add_text("samples", shown, step)


class PredictionWriter(BasePredictionWriter):
    """Writes each prompt and its continuation to stdout and to `output` (one file per rank)."""

    def __init__(self, output: str = "predictions.txt"):
        super().__init__(write_interval="batch")
        self.output = output

    def path(self, trainer: L.Trainer) -> Path:
        p = Path(self.output)
        return p if trainer.world_size == 1 else p.with_name(f"{p.stem}.rank{trainer.global_rank}{p.suffix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        with self.path(trainer).open("a", encoding="utf-8") as f:
            for prompt, text in prediction:
                record = f"{prompt}{text}\n"
                print(record, flush=True)
                f.write(record + "\n")
