"""Callbacks the tests inject through --trainer.callbacks to interrupt real runs at a known step."""

import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class StopAtStep(L.Callback):
    """Ends fit gracefully after `step` optimizer steps, as a user's callback might."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class HangAtStep(L.Callback):
    """Blocks forever once `step` steps are done, so the test can SIGKILL a run mid-training."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        while trainer.global_step >= self.step:
            time.sleep(1)


class MarkAtStep(L.Callback):
    """Writes the file `path` once `step` optimizer steps are done: the test outside knows the run is
    training (every signal handler in place) without guessing how long start-up takes."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step and not os.path.exists(self.path):
            Path(self.path).write_text(str(trainer.global_step))


class SlowSteps(L.Callback):
    """Sleeps after each step, so a signal reliably lands mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args):
        time.sleep(self.seconds)


class SignalInValidation(L.Callback):
    """Sends this process SIGTERM once the first batch of the validation round at `step` is scored, as a
    Ctrl-C or a scheduler's stop during validation would."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.step and batch_idx == 0 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


class PoisonAtStep(L.Callback):
    """Sets a weight to inf once `step` steps are done, as a diverging run would, so the loss turns nan."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            next(pl_module.parameters()).data.fill_(float("inf"))


class RecordDropout(L.Callback):
    """Saves, at `step`, which inputs the GPT's embedding dropout zeroed on this rank and the windows it
    trained on (to `path`.rankN.pt)."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_start(self, trainer, pl_module):
        def hook(module, args, out):
            if trainer.global_step == self.step:
                torch.save({"mask": out == 0, "x": self.batch}, f"{self.path}.rank{trainer.global_rank}.pt")

        pl_module.net.drop.register_forward_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch[0]


class CountGraphs(L.Callback):
    """Writes torch.compile's count of compiled graphs after each validation round, as a JSON list."""

    def __init__(self, path: str):
        self.path, self.counts = path, []

    def on_validation_end(self, trainer, pl_module):
        from torch._dynamo.utils import counters

        self.counts.append(counters["stats"]["unique_graphs"])
        Path(self.path).write_text(json.dumps(self.counts))


class ScrambleAtStep(L.Callback):
    """Adds large noise to every weight once `step` steps are done: the model gets much worse but stays
    finite, as a bad learning rate would make it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 2)


class InterruptAtStartUp(L.Callback):
    """Presses Ctrl-C (SIGINT to this process) during start-up, once the run folder exists."""

    def on_fit_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the KeyboardInterrupt arrives here


class CountSamples(L.Callback):
    """Counts the module's generate() calls during fit on this rank and writes the count to `path`.rankN."""

    def __init__(self, path: str):
        self.path, self.count = path, 0

    def on_train_start(self, trainer, pl_module):
        generate = pl_module.generate

        def counted(*args, **kwargs):
            self.count += 1
            return generate(*args, **kwargs)

        pl_module.generate = counted

    def on_train_end(self, trainer, pl_module):
        Path(f"{self.path}.rank{trainer.global_rank}").write_text(str(self.count))
