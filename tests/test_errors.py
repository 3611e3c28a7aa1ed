"""Every bad input: one clear message, a non-zero exit, no traceback, and no damage to earlier files."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from lightning_charlm.cli import main
from lightning_charlm.errors import CharLMError, user_error
from tests.conftest import charlm_main, make_corpus
from tests.test_cli import TINY
from tests.test_resume import several_callbacks

SHORT = ["--trainer.max_steps", "10", "--trainer.val_check_interval", "5", "--sample.every_n_steps", "1000"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a corpus, odd files, and a finished run whose files must survive every case."""
    tmp = tmp_path_factory.mktemp("errors")
    make_corpus(tmp)
    res = charlm_main("fit", *TINY, *SHORT, "--data.path", "corpus.txt", cwd=tmp)
    assert res.returncode == 0, res.stderr
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("To be, or not to be.\n" * 3)
    (tmp / "latin1.txt").write_bytes(b"caf" + b"\xe9 au lait\n" * 50)
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    (tmp / "kept.txt").write_text("an earlier prediction\n")
    (tmp / "other.txt").write_text("Ünïcödé ✓ 世界 🙂\n" * 400)
    (tmp / "blocked").write_text("a file where the logs folder should be\n")
    (tmp / "latin1-prompts.txt").write_bytes(b"caf\xe9\n")
    (tmp / "no-prompts.txt").write_text("")
    (tmp / "empty.yaml").write_text("")
    (tmp / "trainer-number.yaml").write_text("trainer: 5\n")
    (tmp / "data-list.yaml").write_text("data: [1, 2]\n")
    ckpt = torch.load(tmp / BEST, weights_only=True)
    torch.save({"state_dict": ckpt["state_dict"]}, tmp / "weights-only.ckpt")
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "vocab"}
    torch.save({**ckpt, "hyper_parameters": hp}, tmp / "no-vocab.ckpt")
    torch.save(
        {**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "n_layer": 3}}, tmp / "mismatch.ckpt"
    )
    return tmp


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`, with the files' contents' hashes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in folder.rglob("*")
    }


BEST = "logs/charlm/version_0/checkpoints/best.ckpt"
FIT = ["fit", *TINY, *SHORT, "--data.path", "corpus.txt"]
PRED = ["predict", "--ckpt_path", BEST, "--trainer.logger", "false", "--generate.max_new_tokens", "5"]
PREDICT = [*PRED, "--writer.output", "out.txt"]
CASES = {
    "corpus missing": (["fit", *TINY, "--data.path", "nope.txt"], r"corpus file not found: nope\.txt"),
    # A folder is a corpus of its files: these are checkpoints and event files, so the first is refused.
    "corpus folder of binary files": (
        ["fit", *TINY, "--data.path", "logs"],
        r"not UTF-8 text: logs/.* byte offset",
    ),
    "corpus pattern matches nothing": (
        ["fit", *TINY, "--data.path", "nope/*.txt"],
        r"no file matches .*nope/\*\.txt",
    ),
    "corpus empty": (["fit", *TINY, "--data.path", "empty.txt"], r"corpus file is empty"),
    "corpus too short": (["fit", *TINY, "--data.path", "short.txt"], r"too short.*at least \d+ characters"),
    "corpus not utf-8": (["fit", *TINY, "--data.path", "latin1.txt"], r"not UTF-8.*0xe9 at byte offset 3"),
    "n_embd not divisible": ([*FIT, "--model.n_embd", "33"], r"n_embd \(33\) must be divisible by .*n_head"),
    "block_size zero": ([*FIT, "--model.block_size", "0"], r"model\.block_size must be a positive"),
    "data block_size zero": ([*FIT, "--data.block_size", "0"], r"data\.block_size must be a positive"),
    "batch_size negative": ([*FIT, "--data.batch_size", "-4"], r"data\.batch_size must be a positive"),
    "n_layer zero": ([*FIT, "--model.n_layer", "0"], r"model\.n_layer must be a positive"),
    "dropout one": ([*FIT, "--model.dropout", "1.0"], r"model\.dropout must be in \[0, 1\)"),
    "label smoothing negative": ([*FIT, "--model.label_smoothing", "-0.1"], r"label_smoothing must be in"),
    "lr zero": ([*FIT, "--model.lr", "0"], r"model\.lr must be > 0"),
    "unknown option": (
        [*FIT, "--model.n_layers", "3"],
        r"unknown option --model\.n_layers \(did you mean --model\.n_layer\?\)",
    ),
    "data block longer than model": ([*FIT, "--data.block_size", "64"], r"longer than the model's context"),
    "max_new_tokens zero": (
        [*PREDICT, "--generate.max_new_tokens", "0"],
        r"generate\.max_new_tokens must be between 1 and",
    ),
    "temperature negative": (
        [*PREDICT, "--generate.temperature", "-1"],
        r"generate\.temperature must be >= 0",
    ),
    "top_k zero": ([*PREDICT, "--generate.top_k", "0"], r"top_k must be >= 1, got 0"),
    "top_k above vocabulary": (
        [*PREDICT, "--generate.top_k", "500"],
        r"top_k must be between 1 and .*\(\d+\)",
    ),
    "seed beyond 64 bits": ([*PREDICT, "--generate.seed", str(2**64)], r"generate\.seed must be between"),
    "prompts an empty list": ([*PRED, "--data.prompts", "[]"], r"--data\.prompts is empty"),
    "top_p zero": ([*PREDICT, "--generate.top_p", "0"], r"top_p must be in \(0, 1\]"),
    "top_p above one": ([*PREDICT, "--generate.top_p", "1.5"], r"top_p must be in \(0, 1\]"),
    "prompt unknown characters": ([*PREDICT, "--data.prompts", '["my lord?"]'], r"'\?' at position 7"),
    "checkpoint missing": (
        ["validate", *TINY, "--ckpt_path", "gone.ckpt"],
        r"checkpoint not found: gone\.ckpt",
    ),
    "not a checkpoint": (
        ["validate", *TINY, "--ckpt_path", "notes.txt"],
        r"notes\.txt is not a readable checkpoint",
    ),
    "other model class": (
        [
            "validate",
            "--model",
            "lightning_charlm.BigramLM",
            "--data.path",
            "corpus.txt",
            "--ckpt_path",
            BEST,
        ],
        r"holds a GPTLM but the config asks for a BigramLM",
    ),
    "predict without a checkpoint": (
        ["predict", "--data.prompts", '["a"]'],
        r"predict needs a trained model",
    ),
    "validate without a checkpoint": (
        ["validate", *TINY],
        r"validate needs a trained model: pass --ckpt_path",
    ),
    "prompts not a list": ([*PREDICT, "--data.prompts", "ROMEO:"], r"--data\.prompts: .*a list, in JSON"),
    "split not a list": ([*FIT, "--data.split", "0.9"], r"--data\.split: .*a list of 2 or 3 fractions"),
    "an abbreviated option": ([*FIT, "--data.pa", "corpus.txt"], r"unknown option --data\.pa"),
    "other vocabulary": (
        ["validate", *TINY, "--data.path", "other.txt", "--ckpt_path", BEST],
        r"best\.ckpt was trained on other text than other\.txt: its vocabulary .* differs",
    ),
    "output is a checkpoint": ([*PRED, "--writer.output", BEST], r"already exists: pass --writer\.overwrite"),
    "output is a directory": ([*PRED, "--writer.output", "logs"], r"--writer\.output logs is a directory"),
    "output inside a file": (
        [*PRED, "--writer.output", "notes.txt/out.txt"],
        r"cannot write --writer\.output",
    ),
    "output empty": ([*PRED, "--writer.output", " "], r"--writer\.output is empty"),
    "failed predict keeps the earlier output": (
        [
            *PRED,
            "--writer.output",
            "kept.txt",
            "--writer.overwrite",
            "true",
            "--data.prompts",
            '["my", "my!"]',
        ],
        r"'!' at position 2",
    ),
    "betas out of range": (
        [*FIT, "--model.betas", "[2.0, 0.5]"],
        r"model\.betas must be two numbers in \[0, 1\)",
    ),
    "sample every -1 steps": ([*FIT, "--sample.every_n_steps", "-1"], r"sample\.every_n_steps must be >= 0"),
    "val_check_interval 0": (
        [*FIT, "--trainer.val_check_interval", "0"],
        r"val_check_interval must be a number",
    ),
    "max_steps negative": (
        [*FIT, "--trainer.max_steps", "-5"],
        r"max_steps must be a number of optimizer steps >= 1",
    ),
    "max_steps 0": ([*FIT, "--trainer.max_steps", "0"], r"--trainer\.max_steps must be .* >= 1 .*, got 0$"),
    "max_steps not an integer": (
        [*FIT, "--trainer.max_steps", "ten"],
        r"max_steps: expected an integer, got ten$",
    ),
    "lr not a number": ([*FIT, "--model.lr", "nan"], r"--model\.lr: expected a number, got nan$"),
    "unit not a choice": (
        [*FIT, "--data.unit", "bytes"],
        r"--data\.unit: expected one of char, byte, got bytes$",
    ),
    "config not found": ([*FIT, "-c", "nope.yaml"], r"charlm: error: config file not found: \S*nope\.yaml$"),
    "config empty": ([*FIT, "-c", "empty.yaml"], r"a -c config must hold options, .* it holds nothing"),
    # jsonargparse would drop `trainer: 5` without a word when a --trainer.* option follows
    "config section a number": (
        [*FIT, "-c", "trainer-number.yaml"],
        r"trainer-number\.yaml: the `trainer:` section must hold options, .* got 5$",
    ),
    "config section a list": (  # would fail later with a traceback
        ["validate", "-c", "data-list.yaml", "--ckpt_path", BEST],
        r"data-list\.yaml: the `data:` section must hold options, .* got \[1, 2\]$",
    ),
    "misspelt option": (
        [*FIT, "--data.pth", "x"],
        r"unknown option --data\.pth \(did you mean --data\.path\?\)",
    ),
    "model too large": ([*FIT, "--model.n_layer", str(10**9)], r"more than 1e\+11: no machine holds it"),
    "prompts file not UTF-8": (
        [*PRED, "--data.prompts_file", "latin1-prompts.txt"],
        r"not UTF-8 text: byte 0xe9",
    ),
    "stdin as a bare -": ([*PRED, "-"], r"to read prompts from standard input, pass --data\.prompts_file -$"),
    "prompts file empty": ([*PRED, "--data.prompts_file", "no-prompts.txt"], r"no-prompts\.txt is empty"),
    "prompts file is a directory": (
        [*PRED, "--data.prompts_file", "logs"],
        r"prompts file logs is a directory",
    ),
    "checkpoint is a directory": (["predict", "--ckpt_path", "logs"], r"--ckpt_path logs is a directory"),
    "checkpoint with weights only": (
        ["predict", "--ckpt_path", "weights-only.ckpt"],
        r"is not a charlm checkpoint",
    ),
    "checkpoint without vocabulary": (["predict", "--ckpt_path", "no-vocab.ckpt"], r"lacks the vocabulary"),
    "checkpoint with other sizes": (
        ["predict", "--ckpt_path", "mismatch.ckpt"],
        r"weights do not fit the model",
    ),
    "checkpoint folder of another run": (
        [*FIT, "--checkpoint.dirpath", "logs/charlm/version_0/checkpoints"],
        r"checkpoints holds the best\.ckpt and last\.ckpt of another run, which this run would replace",
    ),
    "checkpoint folder not writable": (
        [*FIT, "--checkpoint.dirpath", "kept.txt/ck"],
        r"cannot write the checkpoint folder \S*kept\.txt/ck \(Not a directory\)$",
    ),
    "val_check_interval a fraction": (
        [*FIT, "--trainer.val_check_interval", "0.5"],
        r"val_check_interval must be a number of optimizer steps >= 1, got 0\.5$",
    ),
    "val_check_interval a duration": (
        [*FIT, "--trainer.val_check_interval", "00:00:00:01"],
        r"val_check_interval must be a number of optimizer steps >= 1, got",
    ),
    "sample prompt outside the vocabulary": (
        [*FIT, "--sample.prompt", "🎉"],
        r"--sample\.prompt '🎉' cannot be sampled: .*'🎉' at position 0",
    ),
    "a model that does not exist": (["fit", "--model", "GPT"], r"--model GPT: no such model; the models are"),
    "early stopping on a metric not validated": (
        [*FIT, "--early_stopping.monitor", "train/foo"],
        r"--early_stopping\.monitor train/foo: not a metric of every validation; choose val/loss, val/ppl",
    ),
    "weights_only false": (
        ["validate", "--ckpt_path", BEST, "--weights_only", "false"],
        r"--weights_only false: charlm loads checkpoints as tensors and primitives only",
    ),
    "logs folder not writable": (
        [*FIT, "--trainer.logger.init_args.save_dir", "blocked"],
        r"cannot write the run folder blocked",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input(case, work, monkeypatch, capsys, caplog):
    """In-process `charlm` (the console script's main), one process for the whole table: a subprocess per
    case would spend most of its time importing torch and Lightning. An uncaught error would escape here
    as an exception instead of the SystemExit that a clean one-line error ends in."""
    args, message = CASES[case]
    before = snapshot(work)
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    err = capsys.readouterr().err
    assert exit.value.code == 2, err[-2000:]
    assert "sampling seed" not in err + caplog.text  # every setting is checked before predict starts
    assert re.search(message, err, re.M), err[-2000:]
    assert "Traceback" not in err
    assert snapshot(work) == before  # nothing changed or removed, and nothing new: no run folder, no .tmp


def test_a_checkpoints_relative_corpus_path_from_another_folder(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # trained in `work` on --data.path corpus.txt
    with pytest.raises(SystemExit) as exit:
        main(["validate", "--ckpt_path", str(work / BEST)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "was trained on --data.path corpus.txt, not found from this folder" in err
    # trained on a pattern (the checkpoint says so): the same words, not "no file matches"
    ckpt = torch.load(work / BEST, weights_only=True)
    ckpt["datamodule_hyper_parameters"]["path"] = "corp*.txt"
    torch.save(ckpt, tmp_path / "pattern.ckpt")
    with pytest.raises(SystemExit) as exit:
        main(["validate", "--ckpt_path", "pattern.ckpt"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "was trained on --data.path corp*.txt, not found from this folder" in err


def test_any_utf8_text_and_long_prompts_work(work):
    fit = charlm_main("fit", *TINY, *SHORT, "--data.path", "other.txt", cwd=work)
    assert fit.returncode == 0, fit.stderr
    best = sorted(work.glob("logs/charlm/version_*/checkpoints/best.ckpt"))[-1]
    val = charlm_main("validate", *TINY, "--data.path", "other.txt", "--ckpt_path", str(best), cwd=work)
    assert val.returncode == 0, val.stderr
    prompt = "世界 🙂 Ünïcödé ✓\n" * 10  # 160 characters: longer than block_size 32, so it is cropped
    prompts = json.dumps([prompt], ensure_ascii=False)  # raw characters, as a user types them
    pred = charlm_main(
        "predict",
        "--ckpt_path",
        str(best),
        "--data.prompts",
        prompts,
        "--generate.max_new_tokens",
        "20",
        "--trainer.logger",
        "false",
        "--writer.output",
        "u.txt",
        cwd=work,
    )
    assert pred.returncode == 0, pred.stderr
    text = (work / "u.txt").read_text(encoding="utf-8")
    assert text.startswith(prompt) and len(text) == len(prompt) + 20 + 2  # 20 new characters, a blank line


def test_non_finite_loss_stops_and_keeps_earlier_checkpoints(tmp_path):
    make_corpus(tmp_path)
    args = [
        "fit",
        *TINY,
        "--data.path",
        "corpus.txt",
        "--trainer.max_steps",
        "40",
        "--trainer.val_check_interval",
        "5",
        "--checkpoint.last_every_n_steps",
        "5",
    ]
    went_on = tmp_path / "went-on"  # written if training went on after the loss turned nan
    poisoned = several_callbacks(
        ("PoisonAtStep", {"step": 12}), ("MarkAtStep", {"step": 14, "path": str(went_on)})
    )
    res = charlm_main(*args, *poisoned, cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert re.search(r"non-finite \(nan or inf\) at step 1[23]\b", res.stderr), res.stderr[-2000:]
    assert not went_on.exists()  # on a CPU it stops at that step (on a GPU: at the next logging step)
    ckpts = tmp_path / "logs/charlm/version_0/checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        state = torch.load(ckpts / name, weights_only=True)
        assert state["global_step"] <= 10
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


def test_no_logger_and_a_module_path_run(work, monkeypatch, capsys):
    """`--trainer.logger false` trains (without a logger there is no learning-rate log to keep), and the
    model named by its full module path is the class the checkpoint holds."""
    monkeypatch.chdir(work)
    nolog = [*FIT, "--trainer.logger", "false", "--trainer.default_root_dir", "nolog"]
    main(nolog)
    assert {p.name for p in (work / "nolog").rglob("*")} == {"checkpoints", "best.ckpt", "last.ckpt"}
    assert not (work / ".lock").exists()  # no run folder to hold: nothing in the working folder either
    kept = (work / "nolog/checkpoints/best.ckpt").read_bytes()
    with pytest.raises(SystemExit):  # a second run would replace the first one's best.ckpt
        main(nolog)
    assert "holds the best.ckpt and last.ckpt of another run" in capsys.readouterr().err
    assert (work / "nolog/checkpoints/best.ckpt").read_bytes() == kept
    main([*nolog[:-4], "--trainer.max_steps", "12", *nolog[-4:], "--ckpt_path", "last"])  # its last.ckpt
    assert torch.load(work / "nolog/checkpoints/last.ckpt", weights_only=True)["global_step"] == 12
    model = ["--model", "lightning_charlm.module.GPTLM", "--data.block_size", "32"]
    main(["validate", *model, "--data.path", "corpus.txt", "--ckpt_path", BEST])
    assert "val/loss" in capsys.readouterr().out


def test_only_an_explicit_cause_makes_an_error_the_users():
    """A crash while handling a user error is a bug: its traceback must show, not the user error's line."""
    try:
        try:
            raise CharLMError("bad option")
        except CharLMError:
            raise KeyError("crash in the handler")  # noqa: B904
    except KeyError as crash:
        assert user_error(crash) is None
    try:
        raise ValueError("wrapped by jsonargparse") from CharLMError("bad option")
    except ValueError as wrapped:
        assert user_error(wrapped) == "bad option"
