"""Every numeric option at 0, -1, nan and a huge value: a clean run or one `charlm: error:` line (exit 2),
never a traceback. In-process through the console script's main(), one pytest process for the whole table;
accepted values train a tiny GPT for a few batches."""

import json

import lightning as L
import pytest

from lightning_charlm.cli import main
from tests.conftest import make_corpus
from tests.test_cli import TINY

HUGE = str(10**12)
VALUES = ["0", "-1", "nan", HUGE]
FIT_OPTIONS = [
    *(f"model.{k}" for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout", "lr", "min_lr")),
    *(f"model.{k}" for k in ("warmup_steps", "weight_decay", "label_smoothing")),
    *(f"data.{k}" for k in ("block_size", "batch_size", "val_stride", "val_batch_size", "seed")),
    "sample.every_n_steps",
    *(f"generate.{k}" for k in ("max_new_tokens", "temperature", "top_k", "seed")),
    *(f"checkpoint.{k}" for k in ("last_every_n_steps", "save_top_k", "every_n_train_steps")),
    "early_stopping.patience",
    "early_stopping.min_delta",
    *(f"trainer.{k}" for k in ("max_steps", "val_check_interval", "log_every_n_steps", "gradient_clip_val")),
    *(f"trainer.{k}" for k in ("accumulate_grad_batches", "limit_val_batches", "num_sanity_val_steps")),
]
PREDICT_OPTIONS = [
    *(f"data.{k}" for k in ("num_samples", "batch_size")),
    *(f"generate.{k}" for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")),
]
# A run with a fuzzed value that is accepted ends after 4 batches, whatever max_steps or accumulation say.
STOP = json.dumps([{"class_path": "tests.test_fuzz.StopAfterBatches", "init_args": {"batches": 4}}])


class StopAfterBatches(L.Callback):
    def __init__(self, batches: int):
        self.batches = batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 >= self.batches:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    make_corpus(tmp)
    return tmp


def run(args: list[str], capsys) -> None:
    """main(args) must return (a clean run) or exit 2 after printing exactly one `charlm: error:` line."""
    try:
        main(args)
    except SystemExit as exit:
        err = capsys.readouterr().err
        assert exit.code == 2, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("charlm: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-2000:]


FIT = [
    "fit",
    *TINY,
    "--data.path",
    "corpus.txt",
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.logger",
    "false",
    "--sample.every_n_steps",
    "2",
    "--generate.max_new_tokens",
    "2",
    "--trainer.callbacks",
    STOP,
]


@pytest.mark.parametrize("option", FIT_OPTIONS)
def test_fit_options(option, work, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(work)
    for value in VALUES:
        run([*FIT, "--trainer.default_root_dir", str(tmp_path / value), f"--{option}", value], capsys)


@pytest.mark.parametrize("option", PREDICT_OPTIONS)
def test_predict_options(option, work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    best = work / "logs/charlm/version_0/checkpoints/best.ckpt"
    if not best.exists():
        main(
            [
                "fit",
                *TINY,
                "--data.path",
                "corpus.txt",
                "--trainer.max_steps",
                "4",
                "--sample.every_n_steps",
                "9",
            ]
        )
    for value in VALUES:
        args = ["predict", "--ckpt_path", str(best), "--generate.max_new_tokens", "4", f"--{option}", value]
        run(args, capsys)
