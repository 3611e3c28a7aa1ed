"""Nothing lost: best.ckpt only improves, outputs never replace files by accident, one process per run folder,
resumes say what they take, and disk or signal trouble leaves earlier files intact with one clear message."""

import pytest

from lightning_charlm.cli import main
from tests.conftest import run_charlm
from tests.test_cli import TINY, scalars
from tests.test_resume import ENV, callbacks

STEPS = ["--trainer.max_steps", "40", "--trainer.val_check_interval", "10", "--sample.every_n_steps", "1000"]


@pytest.mark.parametrize("case", ["from another working directory", "with an absolute save_dir"])
def test_resume_never_replaces_a_better_best(case, tmp_path, corpus):
    """A worse model (weights scrambled right after the resume) must not replace best.ckpt. Lightning alone
    forgets the best score in both cases, since the checkpoint folder's path string differs."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    save_dir = str(home / "logs") if case == "with an absolute save_dir" else "logs"
    args = ["fit", *TINY, "--data.path", str(corpus), *STEPS, "--trainer.logger.init_args.save_dir", save_dir]
    first = run_charlm(*args, *callbacks("StopAtStep", step=20), cwd=home, env=ENV)
    assert first.returncode == 0, first.stderr
    root = home / "logs/charlm/version_0"
    best = root / "checkpoints/best.ckpt"
    kept = best.read_bytes()
    if case == "with an absolute save_dir":
        resume, cwd = "last", home
    else:
        resume, cwd = str(root / "checkpoints/last.ckpt"), elsewhere
    second = run_charlm(*args, "--ckpt_path", resume, *callbacks("ScrambleAtStep", step=21), cwd=cwd, env=ENV)
    assert second.returncode == 0, second.stderr
    assert not (elsewhere / "logs").exists()  # it went on in its own run folder
    val = {e.step + 1: e.value for e in scalars(root).Scalars("val/loss")}
    assert min(val[30], val[40]) > min(val[10], val[20]), val  # the scrambled model is worse
    assert best.read_bytes() == kept
    assert "dirpath has changed" not in second.stderr


def test_predict_checks_every_prompt_before_generating(tmp_path, corpus, monkeypatch, capsys):
    fit = run_charlm("fit", *TINY, "--data.path", str(corpus), *STEPS, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    monkeypatch.chdir(tmp_path)
    best = "logs/charlm/version_0/checkpoints/best.ckpt"
    args = ["predict", "--ckpt_path", best, "--data.batch_size", "1", "--data.prompts", '["the", "the?"]']
    with pytest.raises(SystemExit) as exit:
        main([*args, "--writer.output", "p.txt"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and "'?' at position 3" in err
    assert "the" not in out and not list(tmp_path.glob("p.txt*"))  # nothing generated, no file left
