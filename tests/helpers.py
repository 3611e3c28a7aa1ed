"""Callbacks the tests inject through --trainer.callbacks to interrupt real runs at a known step."""

import time

import lightning as L


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


class SlowSteps(L.Callback):
    """Sleeps after each step, so a signal reliably lands mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args):
        time.sleep(self.seconds)


class PoisonAtStep(L.Callback):
    """Sets a weight to inf once `step` steps are done, as a diverging run would, so the loss turns nan."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            next(pl_module.parameters()).data.fill_(float("inf"))
