"""Real 2-process DDP on CPU (gloo) through the console script: exact validation and resume across ranks."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import CHARLM, charlm_main, make_corpus, run_charlm
from tests.test_cli import TINY, scalars
from tests.test_resume import ENV, callbacks

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
RUN = [
    *TINY,
    "--model.dropout",
    "0.1",
    "--trainer.max_steps",
    "20",
    "--trainer.val_check_interval",
    "10",
    "--sample.every_n_steps",
    "10",
    "--generate.max_new_tokens",
    "8",
]


def val_loss(stdout: str, name: str = "val/loss") -> float:
    return float(re.search(name + r"\W+([0-9.]+)", stdout).group(1))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    corpus = make_corpus(tmp)
    # Both only record (dropout masks at step 5, samples per rank): the run is unchanged.
    spies = [
        {"class_path": "tests.helpers.RecordDropout", "init_args": {"step": 5, "path": str(tmp / "mask")}},
        {"class_path": "tests.helpers.CountSamples", "init_args": {"path": str(tmp / "samples")}},
    ]
    spy = ["--trainer.callbacks", json.dumps(spies)]
    res = run_charlm("fit", *RUN, *DDP, "--data.path", str(corpus), *spy, cwd=tmp, env=ENV)
    assert res.returncode == 0, res.stderr
    # each rank's bookkeeping is not the user's: no per-rank seed line, no banner, no deprecation per save
    noise = ("Seed set to", "Initializing distributed", "distributed_backend=", "all_gather is deprecated")
    assert not [line for line in noise if line in res.stdout + res.stderr], res.stdout + res.stderr
    return tmp, corpus


def test_each_rank_draws_its_own_dropout_masks_and_windows(ddp_run):
    tmp, _ = ddp_run
    rank0, rank1 = (torch.load(tmp / f"mask.rank{r}.pt") for r in (0, 1))
    assert (
        rank0["mask"].shape == rank1["mask"].shape and 0 < rank0["mask"].float().mean() < 0.3
    )  # dropout ran
    assert not torch.equal(rank0["mask"], rank1["mask"])
    assert not torch.equal(rank0["x"], rank1["x"])  # different training windows


def test_ddp_validate_equals_single_process(ddp_run):
    tmp, corpus = ddp_run
    best = tmp / "logs/charlm/version_0/checkpoints/best.ckpt"
    args = [
        "validate",
        *TINY,
        "--data.path",
        str(corpus),
        "--ckpt_path",
        str(best),
        "--trainer.logger",
        "false",
    ]
    two = run_charlm(*args, *DDP, cwd=tmp)
    one = charlm_main(*args, cwd=tmp)
    assert two.returncode == 0 and one.returncode == 0, two.stderr + one.stderr
    assert abs(val_loss(two.stdout) - val_loss(one.stdout)) < 1e-5
    # `charlm test` on a third part, sharded over the two ranks: the same exact mean as one process.
    test = ["test", *args[1:], "--data.split", "[0.8,0.1,0.1]"]
    two, one = run_charlm(*test, *DDP, cwd=tmp), charlm_main(*test, cwd=tmp)
    assert two.returncode == 0 and one.returncode == 0, two.stderr + one.stderr
    assert abs(val_loss(two.stdout, "test/loss") - val_loss(one.stdout, "test/loss")) < 1e-5
    rng = torch.load(best, weights_only=True)["rng"]["cpu"]
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])  # each rank's own RNG state


def test_samples_are_made_on_rank_0_only(ddp_run):
    tmp, _ = ddp_run
    assert [int((tmp / f"samples.rank{r}").read_text()) for r in (0, 1)] == [2, 0]  # steps 10 and 20


def test_ddp_resume_after_sigkill_is_exact(ddp_run, tmp_path):
    """Both processes killed at once (a lost node) at step 15; resumed from the last.ckpt of step 10."""
    ref_tmp, corpus = ddp_run
    data = ["--data.path", str(corpus)]
    args = [CHARLM, "fit", *RUN, *DDP, *data, *callbacks("HangAtStep", step=15)]
    out = subprocess.DEVNULL
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=os.environ | ENV, stdout=out, stderr=out, start_new_session=True
    )
    ckpt = tmp_path / "logs/charlm/version_0/checkpoints/last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.exists() and _step(ckpt) == 10):
        time.sleep(0.5)
    time.sleep(2)  # both ranks now hang at step 15
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _step(ckpt) == 10
    resumed = run_charlm("fit", *RUN, *DDP, *data, "--ckpt_path", "last", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "logs/charlm/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(ref_tmp / "logs/charlm/version_0/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def _step(ckpt) -> int | None:
    try:
        return torch.load(ckpt, weights_only=True, mmap=True)["global_step"]
    except Exception:  # still being written
        return None


def test_single_process_checkpoint_resumes_under_ddp(ddp_run, tmp_path):
    _, corpus = ddp_run
    data = ["--data.path", str(corpus)]
    one = charlm_main("fit", *RUN, *data, *callbacks("StopAtStep", step=10), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    last = tmp_path / "logs/charlm/version_0/checkpoints/last.ckpt"
    before = torch.load(last, weights_only=True)
    two = run_charlm("fit", *RUN, *DDP, *data, "--ckpt_path", "last", cwd=tmp_path, env=ENV)
    assert two.returncode == 0, two.stderr
    resumed = torch.load(last, weights_only=True)
    assert before["global_step"] == 10 and resumed["global_step"] == 20
    rng = resumed["rng"]["cpu"]
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])  # now one state per rank, each its own
    moved = [
        k for k in before["state_dict"] if not torch.equal(before["state_dict"][k], resumed["state_dict"][k])
    ]
    assert moved  # the two processes trained the single-process weights on
    val = [e.value for e in scalars(tmp_path / "logs/charlm/version_0").Scalars("val/loss")]
    assert len(val) == 2 and val[1] < val[0]


def test_ddp_predict_writes_one_file_per_rank_and_copies_differ(ddp_run, tmp_path):
    """3 prompts + 4 copies of one, split over 2 ranks: a file per rank, every copy its own text, and one
    fresh seed for the run, the same on both ranks (broadcast)."""
    tmp, _ = ddp_run
    best = tmp / "logs/charlm/version_0/checkpoints/best.ckpt"
    prompts = ["the", "my lord", "king", *["the"] * 4]
    res = run_charlm(
        "predict",
        "--ckpt_path",
        str(best),
        "--data.prompts",
        json.dumps(prompts),
        "--generate.max_new_tokens",
        "30",
        "--writer.format",
        "jsonl",
        *DDP,
        "--writer.output",
        str(tmp_path / "p.jsonl"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    files = sorted(tmp_path.glob("p.rank*.jsonl"))
    assert [f.name for f in files] == ["p.rank0.jsonl", "p.rank1.jsonl"]
    ranks = [[json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()] for f in files]
    # Rank r continues every other prompt starting at r.
    assert [[r["prompt"] for r in records] for records in ranks] == [prompts[0::2], prompts[1::2]]
    assert all(len(r["text"]) == 30 for records in ranks for r in records)
    the = [r["text"] for records in ranks for r in records if r["prompt"] == "the"]
    assert len(the) == 5 and len(set(the)) == 5, the
    assert len({r["seed"] for records in ranks for r in records}) == 1  # one run seed, agreed by the ranks
