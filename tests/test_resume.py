"""Exact resume (after a callback stop, SIGKILL and SIGTERM); crash- and pickle-safe checkpoint loading."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CHARLM, charlm_main, make_corpus
from tests.test_cli import TINY, scalars

REPO = str(Path(__file__).resolve().parents[1])
ENV = {"PYTHONPATH": REPO}  # so the runs can import tests.helpers
RUN = [
    *TINY,
    "--model.dropout",
    "0.1",
    "--trainer.max_steps",
    "40",
    "--trainer.val_check_interval",
    "15",
    "--checkpoint.last_every_n_steps",
    "10",
    "--sample.every_n_steps",
    "12",
    "--generate.max_new_tokens",
    "8",
    "--data.val_batch_size",
    "2",  # several validation batches: a signal can land inside a round
]


def callbacks(name: str, **kwargs) -> list[str]:
    return several_callbacks((name, kwargs))


def several_callbacks(*specs: tuple[str, dict]) -> list[str]:
    """--trainer.callbacks with helpers' callbacks, each (name, init_args): one option (a second would
    replace the first's list)."""
    chosen = [{"class_path": f"tests.helpers.{name}", "init_args": kwargs} for name, kwargs in specs]
    return ["--trainer.callbacks", json.dumps(chosen)]


def last(tmp: Path, version: int = 0) -> dict:
    return torch.load(tmp / f"logs/charlm/version_{version}/checkpoints/last.ckpt", weights_only=True)


def assert_same_params(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == 40
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # EarlyStopping (patience count, best score) and checkpoint state as if never interrupted
    assert a["callbacks"] == b["callbacks"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request) -> dict:
    """An uninterrupted 40-step run."""
    tmp = tmp_path_factory.mktemp("reference")
    corpus = request.getfixturevalue("module_corpus")
    res = charlm_main("fit", *RUN, "--data.path", str(corpus), cwd=tmp)
    assert res.returncode == 0, res.stderr
    return last(tmp)


@pytest.fixture(scope="module")
def module_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_resume_after_callback_stop_is_bitwise_exact(tmp_path, module_corpus, reference):
    data = ["--data.path", str(module_corpus)]
    first = charlm_main("fit", *RUN, *data, *callbacks("StopAtStep", step=20), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert last(tmp_path)["global_step"] == 20
    second = charlm_main("fit", *RUN, *data, "--ckpt_path", "last", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert not (tmp_path / "logs/charlm/version_1").exists()  # continued in the same run folder
    assert len(list((tmp_path / "logs/charlm/version_0").glob("events.out.tfevents.*"))) == 2
    assert_same_params(last(tmp_path), reference)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, module_corpus, reference):
    data = ["--data.path", str(module_corpus)]
    args = [CHARLM, "fit", *RUN, *data, *callbacks("HangAtStep", step=25)]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=os.environ | ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "logs/charlm/version_0/checkpoints/last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.exists() and last(tmp_path)["global_step"] == 20):
        time.sleep(0.5)
    time.sleep(1)  # it now hangs at step 25
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last(tmp_path)["global_step"] == 20
    resumed = charlm_main("fit", *RUN, *data, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_params(last(tmp_path), reference)
    assert not list(tmp_path.rglob("*.tmp"))  # a file cut short by the kill is replaced by the next write


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_last_and_resumes_exactly(sig, tmp_path, module_corpus, reference):
    data, mark = ["--data.path", str(module_corpus)], tmp_path / "training"
    args = [
        CHARLM,
        "fit",
        *RUN,
        *data,
        "--checkpoint.last_every_n_steps",
        "1000",
        "--trainer.val_check_interval",
        "1000",  # no validation either: only the signal can write last.ckpt
        *several_callbacks(("SlowSteps", {"seconds": 0.3}), ("MarkAtStep", {"step": 3, "path": str(mark)})),
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=os.environ | ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not mark.exists():  # a few steps of training
        time.sleep(0.1)
    assert not (tmp_path / "logs/charlm/version_0/checkpoints/last.ckpt").exists()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "--ckpt_path last" in err and "Traceback" not in err
    stopped_at = last(tmp_path)["global_step"]
    assert 0 < stopped_at < 40
    assert f"charlm: stopped by a signal at step {stopped_at}; continue with --ckpt_path last\n" in err
    assert "charlm: saved logs/charlm/version_0/checkpoints/last.ckpt" in err
    assert err.count("stopped by a signal") == 1
    assert status(tmp_path) is None  # TensorBoard's HParams tab: not "success" (its first status is kept)
    resumed = charlm_main("fit", *RUN, *data, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_params(last(tmp_path), reference)
    assert status(tmp_path) == "STATUS_SUCCESS"  # the resumed run ran to its end, in the same folder


def status(tmp_path) -> str | None:
    """The run's status on TensorBoard's HParams tab, None where none is recorded."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    content = scalars(tmp_path / "logs/charlm/version_0").PluginTagToContent("hparams")
    if "_hparams_/session_end_info" not in content:
        return None
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    return api_pb2.Status.Name(end.session_end_info.status)


def test_last_with_no_run_is_a_clear_error(tmp_path, corpus):
    res = charlm_main("fit", *TINY, "--data.path", str(corpus), "--ckpt_path", "last", cwd=tmp_path)
    assert res.returncode != 0 and "no run to resume" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "logs").exists()
    res = charlm_main("predict", "--data.path", str(corpus), "--ckpt_path", "last", cwd=tmp_path)
    assert res.returncode == 2 and "no run to use" in res.stderr and "config of its run (-c)" in res.stderr


def test_truncated_and_pickled_checkpoints_are_refused(tmp_path, reference):
    good = tmp_path / "good.ckpt"
    torch.save(reference, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    res = charlm_main("predict", "--ckpt_path", str(truncated), "--trainer.logger", "false", cwd=tmp_path)
    assert res.returncode != 0 and "truncated.ckpt" in res.stderr and "Traceback" not in res.stderr

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({**reference, "extra": Payload()}, evil)
    for cmd in (["predict", "--trainer.logger", "false"], ["fit", *TINY]):
        res = charlm_main(*cmd, "--ckpt_path", str(evil), cwd=tmp_path)
        assert res.returncode != 0 and "refused to load" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()


def test_a_resumed_run_logs_at_the_same_steps_as_an_uninterrupted_one(tmp_path, corpus):
    """Lightning counts the logger's step after a step's validation, so the checkpoint written there held it
    one behind: each resume shifted every later TensorBoard point back by one step."""
    from tests.test_cli import scalars

    args = [*TINY, "--data.path", str(corpus), "--trainer.val_check_interval", "4"]
    args += ["--trainer.log_every_n_steps", "1", "--sample.every_n_steps", "0"]
    for steps, resume in (("10", []), ("20", ["--ckpt_path", "last"])):
        res = charlm_main("fit", *args, "--trainer.max_steps", steps, *resume, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    ea = scalars(tmp_path / "logs/charlm/version_0")
    # sorted: two runs in one process within a second write event files TensorBoard may read out of order
    assert sorted(e.step for e in ea.Scalars("val/loss")) == [3, 7, 9, 11, 15, 19]  # global steps 4, 8, ...
    assert sorted(e.step for e in ea.Scalars("train/loss")) == list(range(20))


def test_a_signal_during_validation_runs_that_round_again_on_resume(tmp_path, module_corpus, reference):
    """Stopped part-way through a validation round, the run resumes with that round run again in full:
    the val/loss curve, best.ckpt and the final weights are those of a run never interrupted (Lightning alone
    skips the round, or finishes only its remaining batches)."""
    from tests.test_cli import scalars

    args = [*RUN, "--data.path", str(module_corpus)]
    res = charlm_main("fit", *args, *callbacks("SignalInValidation", step=15), cwd=tmp_path)
    assert res.returncode == 1 and last(tmp_path)["global_step"] == 15
    assert "stopped by a signal at step 15;" in res.stderr
    # Resumed, and stopped again right after the next round (step 30): a resume at a validation step must
    # not score that round a second time.
    res = charlm_main("fit", *args, "--ckpt_path", "last", *callbacks("StopAtStep", step=30), cwd=tmp_path)
    assert res.returncode == 0 and last(tmp_path)["global_step"] == 30, res.stderr
    res = charlm_main("fit", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    steps = [e.step for e in scalars(tmp_path / "logs/charlm/version_0").Scalars("val/loss")]
    # Sorted: the three runs' event files, written within a second in one process, may be read in any order.
    assert sorted(steps) == [14, 29, 39]
    assert_same_params(last(tmp_path), reference)  # weights, and the best score and patience of every round


def test_a_resume_from_behind_the_runs_end_says_last_ckpt_will_be_replaced(tmp_path, corpus, caplog):
    args = [
        *TINY,
        "--data.path",
        str(corpus),
        "--trainer.val_check_interval",
        "5",
        "--sample.every_n_steps",
        "0",
    ]
    ckpts = tmp_path / "logs/charlm/version_0/checkpoints"
    for steps, resume in (("5", []), ("10", ["--ckpt_path", "last"])):
        assert charlm_main("fit", *args, "--trainer.max_steps", steps, *resume, cwd=tmp_path).returncode == 0
        if steps == "5":
            (ckpts / "early.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes())  # a step-5 copy
    assert "will be replaced" not in caplog.text  # resumed from last.ckpt itself
    res = charlm_main(
        "fit", *args, "--trainer.max_steps", "12", "--ckpt_path", str(ckpts / "early.ckpt"), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "resuming at step 5 (early.ckpt): the run's last.ckpt, at step 10, will be replaced" in caplog.text
    assert "val/loss is now scored on other windows" not in caplog.text  # the same windows so far
    res = charlm_main(
        "fit",
        *args,
        "--trainer.max_steps",
        "14",
        "--ckpt_path",
        "last",
        "--data.block_size",
        "16",
        cwd=tmp_path,
    )
    assert (
        res.returncode == 0
        and "resuming with --data.block_size 16 (the run trained on windows of 32)" in (caplog.text)
    )
