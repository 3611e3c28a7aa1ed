"""Nothing lost: best.ckpt only improves, outputs never replace files by accident, one process per run folder,
resumes say what they take, and disk or signal trouble leaves earlier files intact with one clear message."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_charlm.cli import main
from tests.conftest import CHARLM, charlm_main, make_corpus, run_charlm
from tests.test_cli import TINY, scalars
from tests.test_errors import snapshot
from tests.test_resume import ENV, callbacks, several_callbacks

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
    staging = tmp_path / "tmpdir"  # Lightning's own writer stages every checkpoint in $TMPDIR first
    staging.mkdir()
    env = ENV | {"TMPDIR": str(staging)}
    first = charlm_main(*args, *callbacks("StopAtStep", step=20), cwd=home)
    assert first.returncode == 0, first.stderr
    root = home / "logs/charlm/version_0"
    best = root / "checkpoints/best.ckpt"
    kept = best.read_bytes()
    if case == "with an absolute save_dir":
        resume, cwd = "last", home
    else:
        resume, cwd = str(root / "checkpoints/last.ckpt"), elsewhere
    second = run_charlm(*args, "--ckpt_path", resume, *callbacks("ScrambleAtStep", step=21), cwd=cwd, env=env)
    assert second.returncode == 0, second.stderr
    assert not (elsewhere / "logs").exists()  # it went on in its own run folder
    val = {e.step + 1: e.value for e in scalars(root).Scalars("val/loss")}
    assert min(val[30], val[40]) > min(val[10], val[20]), val  # the scrambled model is worse
    assert best.read_bytes() == kept
    assert "dirpath has changed" not in second.stderr
    assert not list(staging.iterdir())  # nothing staged elsewhere


def test_predict_checks_every_prompt_before_generating(tmp_path, corpus, monkeypatch, capsys):
    fit = charlm_main("fit", *TINY, "--data.path", str(corpus), *STEPS, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    monkeypatch.chdir(tmp_path)
    best = "logs/charlm/version_0/checkpoints/best.ckpt"
    args = ["predict", "--ckpt_path", best, "--data.batch_size", "1", "--data.prompts", '["the", "the?"]']
    with pytest.raises(SystemExit) as exit:
        main([*args, "--writer.output", "p.txt"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and "prompt 'the?': characters not in" in err and "'?' at position 3" in err
    assert "the" not in out and not list(tmp_path.glob("p.txt*"))  # nothing generated, no file left


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at step 20 of 40: something to resume."""
    tmp = tmp_path_factory.mktemp("stopped")
    corpus = make_corpus(tmp)
    res = run_charlm(
        "fit", *TINY, "--data.path", str(corpus), *STEPS, *callbacks("StopAtStep", step=20), cwd=tmp, env=ENV
    )
    assert res.returncode == 0, res.stderr
    return tmp


RESUME_CASES = {
    "changed model options": (
        ["--model.n_layer", "3", "--model.lr", "0.01"],
        r"--model\.n_layer 3 \(the checkpoint has 2\); --model\.lr 0\.01 \(the checkpoint has 0\.001\)",
    ),
    "max_steps not above the step": (["--trainer.max_steps", "20"], r"is at step 20 already"),
    "data longer than the model": (["--data.block_size", "64"], r"longer than the model's context"),
}


@pytest.mark.parametrize("case", RESUME_CASES, ids=list(RESUME_CASES))
def test_refused_resume_writes_nothing(case, stopped_run, monkeypatch, capsys):
    extra, message = RESUME_CASES[case]
    before = snapshot(stopped_run)
    monkeypatch.chdir(stopped_run)
    with pytest.raises(SystemExit) as exit:
        main(["fit", *TINY, "--data.path", "corpus.txt", *STEPS, "--ckpt_path", "last", *extra])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and re.search(message, err), err[-2000:]
    assert snapshot(stopped_run) == before  # no new file, none changed: config.yaml and events included


def test_refused_or_interrupted_fresh_run_leaves_no_folder(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", *TINY, "--data.path", str(corpus), "--data.block_size", "64"])
    assert "longer than the model's context" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
    # Ctrl-C during start-up: Lightning stops, and the new run folder (which holds no checkpoint) goes.
    res = run_charlm(
        "fit", *TINY, "--data.path", str(corpus), *callbacks("InterruptAtStartUp"), cwd=tmp_path, env=ENV
    )
    assert res.returncode == 130 and res.stderr.endswith("charlm: interrupted\n"), res.stderr[-2000:]
    assert "Detected KeyboardInterrupt" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "logs").exists(), res.stderr[-2000:]  # nor logs/charlm/ above it, made for it


def test_a_second_process_cannot_write_a_run_folder_in_use(stopped_run, tmp_path):
    run, mark = shutil.copytree(stopped_run, tmp_path / "run"), tmp_path / "training"
    args = ["fit", *TINY, "--data.path", "corpus.txt", *STEPS, "--ckpt_path", "last"]
    # 20 steps to go: it holds the folder for 40 s
    slow = several_callbacks(("SlowSteps", {"seconds": 2}), ("MarkAtStep", {"step": 21, "path": str(mark)}))
    first = subprocess.Popen(
        [CHARLM, *args, *slow], cwd=run, env=os.environ | ENV, stderr=subprocess.PIPE, text=True
    )
    try:
        lock = run / "logs/charlm/version_0/.lock"
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.2)
        second = charlm_main(*args, cwd=run)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by another charlm process (PID {first.pid})" in second.stderr
    finally:  # stopped once it trains (a SIGTERM before Lightning's handler is set would kill it)
        while time.time() < deadline + 60 and first.poll() is None and not mark.exists():
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    last = torch.load(run / "logs/charlm/version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] > 20  # the first process went on undisturbed and saved on SIGTERM


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fill a disk")
def test_a_full_disk_is_one_clear_error_and_keeps_the_checkpoints(stopped_run, tmp_path):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    ckpts = run / "logs/charlm/version_0/checkpoints"
    before = {name: (ckpts / name).read_bytes() for name in ("best.ckpt", "last.ckpt")}
    for name in before:  # every checkpoint write: ENOSPC
        (ckpts / f"{name}.tmp").symlink_to("/dev/full")
    res = charlm_main("fit", *TINY, "--data.path", "corpus.txt", *STEPS, "--ckpt_path", "last", cwd=run)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.search(r"cannot write the checkpoint .*\.ckpt \(No space left on device\)", res.stderr)
    assert {name: (ckpts / name).read_bytes() for name in before} == before
    assert not list(ckpts.glob("*.tmp"))


@pytest.mark.parametrize("delay", [0.05, 0.4])
def test_ctrl_c_twice_leaves_a_valid_last_checkpoint(delay, tmp_path, corpus):
    """The second Ctrl-C lands while last.ckpt is being saved: a 6 M-parameter model with AdamW makes a
    ~75 MB file, a few tenths of a second of writing here."""
    big = ["--model.n_embd", "512", "--model.n_head", "8"]
    args = ["fit", *TINY, *big, "--data.path", str(corpus), *STEPS, *callbacks("SlowSteps", seconds=0.3)]
    proc = subprocess.Popen(
        [CHARLM, *args],
        cwd=tmp_path,
        env=os.environ | ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpts = tmp_path / "logs/charlm/version_0/checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "last.ckpt").exists():  # the validation at step 10 saved
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] >= 10
    assert not list(ckpts.glob("*.tmp"))


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    """A Ctrl-C in the first seconds, while torch and Lightning import, ends like a later one."""
    proc = subprocess.Popen([CHARLM, "fit"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    # Sent once torch's library is mapped: charlm's handler is in place (it is set before the imports
    # begin) and the imports go on for seconds. A fixed wait could fall before it on a busy machine.
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 60
    while time.time() < deadline and proc.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "charlm: interrupted", err[-2000:]


def test_sigterm_during_predict_stops_and_keeps_the_text(stopped_run, tmp_path):
    best = stopped_run / "logs/charlm/version_0/checkpoints/best.ckpt"
    out = tmp_path / "p.txt"
    args = ["predict", "--ckpt_path", str(best), "--data.batch_size", "1", "--writer.output", str(out)]
    long = ["--data.prompts", '["the", "my"]', "--generate.max_new_tokens", "2000000"]  # hours on a CPU
    proc = subprocess.Popen(
        [CHARLM, *args, *long], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "p.txt.tmp").exists():  # generation is about to start
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10  # stopped at the next token, not after 2 million
    assert proc.returncode == 1 and "Traceback" not in err and "stopped by a signal" in err, err[-2000:]
    assert f"charlm: stopped by a signal: 1 continuation (the last cut short) written to {out}\n" in err
    assert err.count("stopped by a signal") == 1  # one line, after the bar and the text
    # predict has no state (charlm's own lines only: the sampled text itself may spell "saved")
    own = [line for line in err.splitlines() if line.startswith("charlm:")]
    assert not any("saved" in line for line in own) and not (tmp_path / "checkpoints").exists()
    text = out.read_text(encoding="utf-8")
    assert text.startswith("the") and len(text) > 10 and not (tmp_path / "p.txt.tmp").exists()


STAGED: list[str] = []  # every temporary file this process creates, seen through Python's audit hooks
sys.addaudithook(lambda event, args: STAGED.append(str(args[0])) if event == "tempfile.mkstemp" else None)


def test_checkpoints_are_never_staged_in_tmpdir(tmp_path, corpus):
    """Lightning's own writer serialises each checkpoint to memory, then to a temporary file in $TMPDIR,
    then copies it: a full $TMPDIR failed saves while the logs disk had room."""
    STAGED.clear()
    res = charlm_main("fit", *TINY, "--data.path", str(corpus), *STEPS, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "logs/charlm/version_0/checkpoints").glob("*.ckpt"))) == 2
    assert STAGED == []
