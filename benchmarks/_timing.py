"""StartupTimes: a callback that writes when each start-up milestone of a `charlm fit` was reached, in
seconds since the launch time the caller put in $CHARLM_LAUNCH, to the JSON file named by $CHARLM_TIMING."""

import json
import os
import resource
import time

import lightning as L
import torch

IMPORTED = time.time()  # jsonargparse imports this module while it builds the callbacks: imports are done


class StartupTimes(L.Callback):
    def __init__(self):
        self.launch = float(os.environ["CHARLM_LAUNCH"])
        self.marks = {"imports done (lightning, torch, charlm)": IMPORTED - self.launch}
        self._mark("arguments parsed, classes built")

    def _mark(self, name: str) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.marks[name] = time.time() - self.launch
        with open(os.environ["CHARLM_TIMING"], "w") as f:
            json.dump(self.marks, f)

    def setup(self, trainer, pl_module, stage):
        self._mark("trainer set up (device, data)")

    def on_sanity_check_end(self, trainer, pl_module):
        self._mark("start-up validation done")

    def on_train_start(self, trainer, pl_module):
        self._mark("training starts")

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 1:
            self.marks["peak RSS (MB) by then"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self._mark("first training step done")
