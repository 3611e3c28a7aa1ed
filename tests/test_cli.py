"""End to end through the installed `charlm` console script, in a subprocess, on a temporary directory."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_charlm import CharDataModule, CharLM
from lightning_charlm.data import IGNORE, StridedWindows
from tests.conftest import charlm_main, run_charlm

TINY = [
    "--model",
    "lightning_charlm.GPTLM",
    "--model.block_size",
    "32",
    "--model.n_layer",
    "2",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "32",
    "--model.dropout",
    "0.0",
    "--model.warmup_steps",
    "5",
    "--data.block_size",
    "32",
    "--data.batch_size",
    "16",
    "--trainer.accelerator",
    "cpu",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def scalars(run: Path) -> EventAccumulator:
    """Every event file of a run folder (a resumed run adds one), as TensorBoard reads them."""
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_fit_validate_predict_end_to_end(tmp_path, corpus, monkeypatch, caplog):
    fit = run_charlm(
        "fit",
        *TINY,
        "--data.path",
        str(corpus),
        "--trainer.max_steps",
        "60",
        "--trainer.val_check_interval",
        "20",
        "--sample.every_n_steps",
        "30",
        "--generate.max_new_tokens",
        "40",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr
    for noise in (
        "GPU available",
        "litlogger",
        "LeafSpec",
        "exists and is not empty",
    ):  # nothing about this run
        assert noise not in fit.stdout + fit.stderr
    run = tmp_path / "logs" / "charlm" / "version_0"
    assert (run / "config.yaml").is_file()
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file()
    ea = scalars(run)
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "val/bpc", "train/tokens_per_s"} <= tags
    assert all(e.value > 0 for e in ea.Scalars("train/tokens_per_s"))
    steps = {tag: [e.step for e in ea.Scalars(tag)] for tag in ("train/loss", "train/tokens_per_s", "lr")}
    assert (
        steps["train/tokens_per_s"] == steps["train/loss"] == steps["lr"] == [49, 59]
    )  # one grid, last step
    lrs = [e.value for e in ea.Scalars("lr")]
    assert lrs[1] < lrs[0]  # the last step's own values (the cosine has moved), not a copy of step 49's
    assert "lr" in tags
    assert "samples/text_summary" in ea.Tags()["tensors"]
    val = [e.value for e in ea.Scalars("val/loss")]
    assert val[-1] < val[0]  # it learned
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["hyper_parameters"]["vocab"] == "".join(sorted(set(corpus.read_text())))
    assert (
        abs(
            ckpt["callbacks"][next(k for k in ckpt["callbacks"] if k.startswith("Checkpoint"))][
                "best_model_score"
            ]
            - min(val)
        )
        < 1e-6
    )

    bar = TINY.index("--trainer.enable_progress_bar")
    with_bar = TINY[:bar] + TINY[bar + 2 :]  # the bar left on: stdout is a pipe here, so none is drawn
    val_run = run_charlm(
        "validate", *with_bar, "--data.path", str(corpus), "--ckpt_path", str(best), cwd=tmp_path
    )
    assert val_run.returncode == 0, val_run.stderr
    reproduced = float(re.search(r"val/loss\W+([0-9.]+)", val_run.stdout).group(1))
    assert abs(reproduced - min(val)) < 1e-5  # the best checkpoint's val/loss, reproduced
    assert "Validation" not in val_run.stdout + val_run.stderr

    # predict needs the checkpoint alone: no corpus anywhere, and the download cache must stay empty
    corpus.unlink()
    nowhere = {"CHARLM_DATA_DIR": str(tmp_path / "no-data"), "XDG_CACHE_HOME": str(tmp_path / "no-cache")}
    out = tmp_path / "samples.txt"
    predict = ["predict", "--ckpt_path", str(best), "--trainer.accelerator", "cpu"]
    prompts = ["--data.prompts", '["the king", "my"]', "--generate.max_new_tokens", "30"]
    pred = run_charlm(*predict, *prompts, "--writer.output", str(out), cwd=tmp_path, env=nowhere)
    assert pred.returncode == 0, pred.stderr
    assert not (tmp_path / "no-cache").exists()
    bf16 = tmp_path / "bf16.txt"
    for name, value in nowhere.items():  # in this process from here on: the console script ran above
        monkeypatch.setenv(name, value)
    gone = ["--data.path", str(corpus), "--seed_everything", "3"]  # corpus options: predict reads none
    res = charlm_main(
        *predict,
        *prompts,
        *gone,
        "--trainer.precision",
        "bf16-mixed",
        "--writer.output",
        str(bf16),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "not used: --data.path, --seed_everything" in caplog.text
    text = bf16.read_text()
    assert text.startswith("the king") and len(text) == len("the king") + len("my") + 2 * (30 + 2)
    # prompt + 30 characters + a blank line, twice (split by length: a text may hold blank lines itself)
    written = out.read_text()
    first = len("the king") + 30
    assert written.startswith("the king") and written[first : first + 4] == "\n\nmy"
    assert len(written) == first + 2 + len("my") + 30 + 2 and written == pred.stdout

    bad = charlm_main(
        "predict",
        "--ckpt_path",
        str(best),
        "--data.prompts",
        '["the king!"]',
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert bad.returncode != 0
    assert "'!' at position 8" in bad.stderr and "Traceback" not in bad.stderr


def test_early_stopping_ends_an_overfitting_run(tmp_path, corpus):
    big = [a if a != "32" else "64" for a in TINY]
    fit = charlm_main(
        "fit",
        *big,
        "--data.path",
        str(corpus),
        "--model.lr",
        "3e-3",
        "--model.min_lr",
        "3e-3",
        "--trainer.max_steps",
        "2000",
        "--trainer.val_check_interval",
        "25",
        "--early_stopping.patience",
        "2",
        "--sample.every_n_steps",
        "100000",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr
    run = tmp_path / "logs" / "charlm" / "version_0"
    val = [(e.step, e.value) for e in scalars(run).Scalars("val/loss")]
    stopped = re.search(
        r"charlm: stopped early at step (\d+) of 2000: val/loss did not improve for 2 ", fit.stdout
    )
    assert stopped and int(stopped.group(1)) == val[-1][0] + 1, fit.stdout
    losses = [v for _, v in val]
    best_round = losses.index(min(losses))
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] < 2000 and last["global_step"] == val[-1][0] + 1  # stopped at a validation
    assert len(val) - 1 - best_round == 2  # patience 2: two rounds without improvement, then the stop
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == val[best_round][0] + 1


def test_charlm_test_scores_the_held_out_test_split(tmp_path, corpus, caplog, recwarn):
    """`charlm test` finds the corpus and the split in the checkpoint and reports the exact test loss; a model
    trained without a test part is refused in one line."""
    quick = ["--trainer.max_steps", "10", "--trainer.val_check_interval", "10", "--sample.every_n_steps", "0"]
    quick += ["--trainer.max_time", "00:01:00:00"]  # a Timer's state in the checkpoint: no one's concern
    fit = charlm_main(
        "fit", *TINY, "--data.path", str(corpus), "--data.split", "[0.8,0.1,0.1]", *quick, cwd=tmp_path
    )
    assert fit.returncode == 0, fit.stderr
    best = tmp_path / "logs/charlm/version_0/checkpoints/best.ckpt"
    res = charlm_main("test", "--ckpt_path", str(best), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "not a held-out figure" not in caplog.text  # its own test part: held out
    assert not [w for w in recwarn if "callbacks used to create the checkpoint" in str(w.message)]
    printed = float(re.search(r"test/loss\s*│\s*([\d.]+)", res.stdout).group(1))
    model = CharLM.load_from_checkpoint(best).eval()
    dm = CharDataModule(path=str(corpus), block_size=32, split=[0.8, 0.1, 0.1])
    x, y = (torch.stack(t) for t in zip(*StridedWindows(dm.test_split, 32, 32), strict=True))
    with torch.no_grad():
        logits = model.net(x).flatten(0, 1)
    exact = F.cross_entropy(logits, y.flatten(), ignore_index=IGNORE).item()
    assert printed == pytest.approx(exact, rel=1e-5)
    assert [p.name for p in (tmp_path / "logs/charlm").iterdir()] == ["version_0"]  # no new run folder
    charlm_main("fit", *TINY, "--data.path", str(corpus), *quick, cwd=tmp_path)
    plain = tmp_path / "logs/charlm/version_1/checkpoints/best.ckpt"
    res = charlm_main("test", "--ckpt_path", str(plain), cwd=tmp_path)
    assert res.returncode == 2 and "no test split" in res.stderr and "Traceback" not in res.stderr
    # Given a test part, the text it scores is the end of what this model was validated on: it says so.
    res = charlm_main("test", "--ckpt_path", str(plain), "--data.split", "[0.8,0.1,0.1]", cwd=tmp_path)
    assert res.returncode == 0 and re.search(
        r"the test part \(the last 10% .*was validated on \(it trained with --data.split \[0.9, 0.1\]\)"
        r": its test loss is not a held-out figure",
        caplog.text,
    )
    # A model named for validation is not the one validated (the checkpoint's is): it says what is unused.
    res = charlm_main(
        "validate",
        "--model",
        "lightning_charlm.GPTLM",
        "--model.n_layer",
        "3",
        "--ckpt_path",
        str(plain),
        cwd=tmp_path,
    )
    assert res.returncode == 0 and f"{plain} is used as it was trained; not used: " in caplog.text
    assert "--model.n_layer 3 (the checkpoint has 2)" in caplog.text
    assert "--model.n_embd" not in caplog.text  # given by no one: a default the named class brings along
    caplog.clear()  # a validation part that reaches into the training text is scored, with a warning
    res = charlm_main("validate", "--ckpt_path", str(plain), "--data.split", "[0.5,0.5]", cwd=tmp_path)
    assert res.returncode == 0 and "the validation part (from 50% of the corpus" in caplog.text
    assert "its val/loss is not a held-out figure" in caplog.text
    caplog.clear()  # an option given without naming a model is not used either, and said so
    res = charlm_main("validate", "--model.n_layer", "4", "--ckpt_path", str(plain), cwd=tmp_path)
    assert res.returncode == 0 and "not used: --model.n_layer 4 (the checkpoint has 2)" in caplog.text
