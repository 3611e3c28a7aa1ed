"""What a new user meets in the first hour: one context length, resumes that say what they change, runs
found by corpus, a quiet console with a summary, TensorBoard's HParams tab, readable --help, predictions
tools can read and a seed that is said aloud."""

import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_charlm.__main__ import SUBCOMMANDS
from lightning_charlm.cli import CharLMCLI
from lightning_charlm.errors import CharLMError
from tests.conftest import CHARLM, charlm_main, make_corpus
from tests.test_cli import TINY, scalars
from tests.test_resume import callbacks

# TINY without --data.block_size: the windows follow --model.block_size.
MODEL_ONLY = [a for i, a in enumerate(TINY) if "--data.block_size" not in TINY[max(0, i - 1) : i + 1]]
QUICK = [
    "--trainer.val_check_interval",
    "10",
    "--sample.every_n_steps",
    "0",
    "--trainer.log_every_n_steps",
    "1",
]


def fit(tmp_path, *args: str):
    res = charlm_main("fit", *MODEL_ONLY, *QUICK, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return res


def on_a_terminal(cmd: list[str], cwd, env: dict | None = None) -> list[str]:
    """Runs cmd with stdout on a pseudo-terminal; what it wrote, read by read; fails unless it exits 0."""
    main, terminal = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=terminal, stderr=subprocess.DEVNULL, cwd=cwd, env=env)
    os.close(terminal)
    reads = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the terminal closed: the process is gone
            break
        if not data:
            break
        reads.append(data.decode())
    assert proc.wait(timeout=120) == 0
    return reads


def test_charlms_own_lines_break_between_words_on_a_terminal_only(monkeypatch, tmp_path):
    """A terminal breaks a long line wherever its width ends, mid-word: charlm breaks its own lines (run
    summary, errors, where it saved) between words first; in a file they stay one line each."""
    from lightning_charlm.console import say

    line = "charlm: error: model.lr must be > 0 and 0 <= model.min_lr <= lr, got lr=0.0, min_lr=0.0001"
    monkeypatch.setenv("COLUMNS", "40")
    main, terminal = pty.openpty()
    with open(terminal, "w", closefd=True) as tty:
        say(line, tty)
    shown = os.read(main, 4096).decode().replace("\r\n", "\n").splitlines()
    os.close(main)
    assert len(shown) > 2 and all(len(part) <= 40 for part in shown) and " ".join(shown) == line
    with open(tmp_path / "log.txt", "w") as file:
        say(line, file)
    assert (tmp_path / "log.txt").read_text() == line + "\n"


def test_the_context_length_is_set_once(tmp_path, corpus):
    assert "--data.block_size" not in MODEL_ONLY and "--model.block_size" in MODEL_ONLY
    fit(tmp_path, "--data.path", str(corpus), "--model.block_size", "16", "--trainer.max_steps", "2")
    config = yaml.safe_load((tmp_path / "logs/charlm/version_0/config.yaml").read_text())
    assert config["data"]["block_size"] == config["model"]["init_args"]["block_size"] == 16
    res = charlm_main("fit", *TINY, "--data.path", str(corpus), "--data.block_size", "64", cwd=tmp_path)
    assert res.returncode == 2 and "leave data.block_size out" in res.stderr


def test_a_resume_with_more_steps_decays_from_where_it_was_and_says_so(tmp_path, corpus, caplog):
    args = [
        "--data.path",
        str(corpus),
        "--model.warmup_steps",
        "5",
        "--model.lr",
        "0.01",
        "--model.min_lr",
        "0.001",
    ]
    fit(tmp_path, *args, "--trainer.max_steps", "40", *callbacks("StopAtStep", step=20))
    fit(tmp_path, *args, "--trainer.max_steps", "60", "--ckpt_path", "last")
    said = re.search(
        r"max_steps 40 -> 60: the learning rate now decays from ([\d.e-]+) at step 20 to 0.001 at step 60",
        caplog.text,
    )
    lr = {e.step: e.value for e in scalars(tmp_path / "logs/charlm/version_0").Scalars("lr")}
    # A fresh 60-step schedule would be at 0.0085 at step 20, the 40-step one was at 0.0065: no jump.
    assert said and float(said.group(1)) == pytest.approx(lr[20], rel=0.01)  # the first resumed step
    assert all(abs(lr[s + 1] - lr[s]) < 5e-4 for s in range(5, 59)), "the schedule jumped"
    assert lr[59] == pytest.approx(0.001, rel=0.02)  # one step before the end of the cosine
    # A finished run trained further stays at min_lr; a later resume with the same max_steps keeps it all.
    fit(tmp_path, *args, "--trainer.max_steps", "70", "--ckpt_path", "last")
    lr = {e.step: e.value for e in scalars(tmp_path / "logs/charlm/version_0").Scalars("lr")}
    assert [lr[s] for s in range(60, 70)] == pytest.approx([0.001] * 10)


def test_the_console_a_run_summary_and_the_hparams_tab(tmp_path, corpus, caplog):
    res = fit(tmp_path, "--data.path", str(corpus), "--trainer.max_steps", "25")
    run = tmp_path / "logs/charlm/version_0"
    assert re.search(
        r"charlm: GPTLM 2 layers x 32, block 32, [\d,]+ parameters on cpu \(32-true\); ", res.stdout
    )
    assert f"corpus.txt, {len(set(corpus.read_text()))} characters -> logs/charlm/version_0" in res.stdout
    assert "note:" not in res.stdout  # a model sized for a CPU (test_a_gpu_sized_model_on_a_cpu_gets_a_note)
    ea = scalars(run)
    val = [e.value for e in ea.Scalars("val/loss")]
    best = [e.value for e in ea.Scalars("hp/best_val_loss")]
    assert [e.step for e in ea.Scalars("hp/best_val_loss")] == [e.step for e in ea.Scalars("val/loss")]
    assert best == pytest.approx([min(val[: i + 1]) for i in range(len(val))])
    assert f"charlm: best val/loss {min(val):.4f}: logs/charlm/version_0/checkpoints/best.ckpt" in res.stdout
    start = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    hparams = {k: v.string_value or v.number_value for k, v in start.session_start_info.hparams.items()}
    assert hparams["model"] == "GPTLM" and hparams["n_layer"] == 2 and hparams["corpus"] == "corpus.txt"
    assert hparams["positions"] == "learned" and hparams["optimizer"] == "adamw"  # runs of an ablation differ
    # No "experiment" summary: TensorBoard would show the columns of the first run's only (a bigram's beside
    # GPT runs hid every GPT column); without one it shows the union of every run's, and every scalar.
    assert "_hparams_/experiment" not in ea.PluginTagToContent("hparams")
    assert hparams["qk_norm"] in ("true", "false")  # a flag in words: TensorBoard shows a bool as 1 or 0
    assert "max_steps" not in hparams  # a resume with more steps would leave it stale (the first is kept)
    for noise in ("GPU available", "Received SIGTERM", "LeafSpec", "Sanity Checking", "Trainable params"):
        assert noise not in caplog.text + res.stdout + res.stderr


def test_early_stopping_says_why_in_its_options_words(tmp_path, corpus):
    stop = ["--early_stopping.monitor", "val/bpc", "--early_stopping.stopping_threshold", "100"]
    res = fit(tmp_path, "--data.path", str(corpus), "--trainer.max_steps", "30", *stop)
    why = "val/bpc reached 100.0 (--early_stopping.stopping_threshold)"
    assert f"charlm: stopped early at step 10 of 30: {why}\n" in res.stdout


def test_fp16_on_a_cpu_says_it_runs_bf16(tmp_path, corpus):
    fp16 = ["--trainer.precision", "16-mixed"]
    res = fit(tmp_path, "--data.path", str(corpus), "--trainer.max_steps", "1", *fp16)
    assert "note: --trainer.precision 16-mixed is for CUDA GPUs; this run uses bf16-mixed" in res.stderr
    assert "parameters on cpu (bf16-mixed)" in res.stdout


def test_a_gpu_sized_model_on_a_cpu_gets_a_note(tmp_path, corpus):
    wide = ["--model.n_layer", "4", "--model.n_embd", "384", "--model.n_head", "6", "--data.batch_size", "2"]
    res = fit(tmp_path, "--data.path", str(corpus), *wide, "--trainer.max_steps", "1")
    assert re.search(
        r"charlm: note: 7\.\dM parameters is a model for a GPU: .* configs/gpt-cpu\.yaml", res.stdout
    )


def test_last_picks_a_run_of_the_same_corpus_and_a_checkpoint_knows_its_corpus(tmp_path):
    (tmp_path / "a").mkdir()
    a, b = make_corpus(tmp_path / "a"), tmp_path / "b.txt"
    b.write_text(a.read_text().upper() + "XYZ!\n")
    fit(tmp_path, "--data.path", str(a), "--trainer.max_steps", "10")  # version_0
    fit(tmp_path, "--data.path", str(b), "--trainer.max_steps", "10")  # version_1, the newest
    fit(tmp_path, "--data.path", str(a), "--trainer.max_steps", "20", "--ckpt_path", "last")
    steps = [
        torch.load(tmp_path / f"logs/charlm/version_{v}/checkpoints/last.ckpt", weights_only=True)[
            "global_step"
        ]
        for v in (0, 1)
    ]
    assert steps == [20, 10]
    c = tmp_path / "c.txt"
    shutil.copy(a, c)
    res = charlm_main("fit", *MODEL_ONLY, "--data.path", "c.txt", "--ckpt_path", "last", cwd=tmp_path)
    assert res.returncode == 2 and re.search(
        r"no run on c\.txt in logs/charlm \(version_1 on .*b\.txt, version_0 on", res.stderr
    )
    # validate (and an explicit resume) read the checkpoint's corpus when none is named
    res = charlm_main("validate", "--ckpt_path", "logs/charlm/version_1/checkpoints/best.ckpt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "val/loss" in res.stdout


def test_help_is_quick_and_says_what_the_options_mean(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal: the line counts below assume 80
    assert set(SUBCOMMANDS) == set(CharLMCLI.subcommands())  # the fast overview cannot drift from the CLI
    start = time.perf_counter()
    overview = subprocess.run([CHARLM, "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert overview.returncode == 0 and all(f"  {name}  " in overview.stdout for name in SUBCOMMANDS)
    assert max(len(line) for line in overview.stdout.splitlines()) <= 80  # an 80-column terminal
    assert seconds < 30  # a timing is measured in the note, not asserted; this only catches a hang
    fit_help = charlm_main("fit", "--help", cwd=tmp_path).stdout
    assert fit_help.startswith("usage: charlm fit [-c CONFIG] [options]\n")  # not every option in brackets
    assert "--data.vocab VOCAB" not in fit_help.split("ARG:")[-1] and "[--data.vocab" not in fit_help
    options = re.findall(r"\n  (--(?:data|generate|writer)\.\w+) [A-Z_ {},a-z]*\n? +(\S[^\n]*)", fit_help)
    assert len(options) >= 14 and not [opt for opt, text in options if text.startswith("(type:")]
    assert "--data.prompts" not in fit_help and "--writer." not in fit_help  # predict's, listed there only
    assert "newest" in fit_help and "`last`" in fit_help  # --ckpt_path in this project's words
    # Options charlm sets itself, or that have no use here, are not listed, yet kept where a config is saved
    assert "--trainer.max_epochs" not in fit_help and "--checkpoint.filename" not in fit_help
    assert "write last.ckpt every" in fit_help and len(fit_help.splitlines()) < 550
    printed = charlm_main("fit", "--trainer.max_epochs", "3", "--print_config", cwd=tmp_path).stdout
    assert "max_epochs: 3" in printed and "filename: best" in printed
    model_help = charlm_main("fit", "--model.help", "GPTLM", cwd=tmp_path).stdout
    assert "Shared by both" not in model_help
    for text in (fit_help, model_help):  # an 80-column terminal: usage and group titles included
        assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("test", "predict"):  # no header of Lightning's cut mid-sentence ("... Useful to:")
        sub_help = charlm_main(name, "--help", cwd=tmp_path).stdout
        assert max(len(line) for line in sub_help.splitlines()) <= 80
        assert f"\ncharlm {name}:\n  --ckpt_path" in sub_help and not re.search(r"(to|your):\n", sub_help)
        # what only training reads is not listed where nothing trains
        assert (
            "--checkpoint." not in sub_help
            and "--sample." not in sub_help
            and "--trainer.max_steps" not in sub_help
        )
        assert "The model to train" not in sub_help and len(sub_help.splitlines()) < 450
        if name == "test":  # nor what only training or sampling reads
            assert "--generate.temperature" not in sub_help and "--data.seed" not in sub_help
            assert "--data.batch_size" not in sub_help and "--data.val_batch_size" in sub_help
    assert (
        "--generate.temperature" in sub_help
        and "--data.prompts " in sub_help
        and "--writer.format" in sub_help
    )
    assert "--data.path" not in sub_help and "--data.val_stride" not in sub_help  # predict reads no corpus


def test_predict_jsonl_and_a_fresh_seed_said_aloud(tmp_path, corpus, caplog):
    fit(tmp_path, "--data.path", str(corpus), "--trainer.max_steps", "10")
    pred = [
        "predict",
        "--ckpt_path",
        "logs/charlm/version_0/checkpoints/best.ckpt",
        "--generate.max_new_tokens",
        "30",
    ]
    pred += ["--data.prompts", '["", "The king"]', "--writer.format", "jsonl"]
    runs = [charlm_main(*pred, cwd=tmp_path) for _ in range(2)]
    seeds = [int(s) for s in re.findall(r"sampling seed (\d+) ", caplog.text)]
    records = [[json.loads(line) for line in r.stdout.splitlines()] for r in runs]
    assert len(seeds) == 2 and seeds[0] != seeds[1] and [r[0]["seed"] for r in records] == seeds
    assert [r["prompt"] for r in records[0]] == ["", "The king"] and all(
        len(r["text"]) == 30 for r in records[0]
    )
    assert records[0][0]["temperature"] == 0.8 and records[0][0]["max_new_tokens"] == 30
    assert records[0] != records[1]  # a fresh seed per run
    again = charlm_main(*pred, "--generate.seed", str(seeds[0]), "--writer.output", "p.jsonl", cwd=tmp_path)
    assert again.returncode == 0 and [json.loads(line) for line in again.stdout.splitlines()] == records[0]
    assert (tmp_path / "p.jsonl").read_text(encoding="utf-8") == again.stdout


def test_the_python_api_stdin_and_one_settings_type(tmp_path, corpus, monkeypatch):
    """load() + generate/stream give predict's text for a seed; prompts from stdin; --generate.* sets both
    predict and the samples during training."""
    import lightning_charlm

    fit(
        tmp_path,
        "--data.path",
        str(corpus),
        "--trainer.max_steps",
        "10",
        "--sample.every_n_steps",
        "5",
        "--generate.max_new_tokens",
        "7",
    )
    run = tmp_path / "logs/charlm/version_0"
    samples = scalars(run).Tensors("samples/text_summary")
    shown = [e.tensor_proto.string_val[0].decode() for e in samples]  # markdown: each line indented by 4
    assert [len("\n".join(line[4:] for line in text.split("\n"))) for text in shown] == [7, 7]
    best = str(run / "checkpoints/best.ckpt")
    settings = ["--generate.max_new_tokens", "40", "--generate.seed", "11", "--generate.temperature", "1.0"]
    piped = subprocess.run(
        [
            CHARLM,
            "predict",
            "--ckpt_path",
            best,
            "--data.prompts_file",
            "-",
            "--writer.format",
            "jsonl",
            *settings,
        ],
        input="\ufeffThe king\nMy lord\n",  # with a byte-order mark, as some editors save: not in the prompt
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # nothing piped in: one clear error
    res = charlm_main("predict", "--ckpt_path", best, "--data.prompts_file", "-", cwd=tmp_path)
    assert res.returncode == 2 and "stdin held no prompts" in res.stderr
    records = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["The king", "My lord"]
    lm = lightning_charlm.load(best)
    assert lm.generate(["The king", "My lord"], max_new_tokens=40, seed=11, temperature=1.0) == [
        r["text"] for r in records
    ]
    alone = lm.generate("The king", max_new_tokens=40, seed=11, temperature=1.0)  # one prompt: a str
    assert "".join(lm.stream("The king", max_new_tokens=40, seed=11, temperature=1.0)) == alone
    # The API's mistakes in words, as the command line's (its options are parsed typed; these are not).
    for call, words in (
        (lambda: list(lm.stream(["The king"])), "stream continues one prompt, a str"),
        (lambda: lm.generate(b"The king"), "generate takes a prompt"),
        (lambda: lm.generate("The king", temperature="0.5"), "generate.temperature must be a number"),
        (lambda: lm.generate("The king", max_new_tokens=5.5), "generate.max_new_tokens must be an integer"),
    ):
        with pytest.raises(CharLMError, match=words):
            call()
    if not torch.cuda.is_available():
        with pytest.raises(CharLMError, match="this machine has no CUDA device"):
            lightning_charlm.load(best, device="cuda")
    with pytest.raises(CharLMError, match="'gpu' is not a device: use 'cpu', 'cuda'"):
        lightning_charlm.load(best, device="gpu")
    assert not lm.training and str(next(lm.parameters()).device) == "cpu"


def test_on_a_terminal_the_bar_then_the_closing_line_and_one_prompt_streams(tmp_path, corpus):
    """On a terminal (a pseudo-terminal here, 80 columns): fit draws the bar's final state before the run's
    closing line, not below it, and breaks the opening line between words; then one prompt's text arrives in
    many pieces as it is generated, without a progress bar breaking it up, and equals the API's text."""
    import lightning_charlm

    cmd = [CHARLM, "fit", *MODEL_ONLY, *QUICK, "--data.path", str(corpus), "--trainer.max_steps", "12"]
    cmd += ["--trainer.enable_progress_bar", "true"]
    out = "".join(on_a_terminal(cmd, tmp_path, env=os.environ | {"COLUMNS": "80", "LINES": "24"}))
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).replace("\r", "\n")
    closing = text.index("charlm: best val/loss")
    assert text.rindex("12/12") < closing  # the full bar, then the closing line; no bar after it
    assert "steps" not in text[closing:]
    opening = text[: text.index(" -> logs/charlm/version_0")].split("charlm: ")[-1]
    assert all(len(line) <= 80 for line in opening.splitlines())
    assert re.search(r"\(32-true\); *\n+corpus\.txt,", opening)  # broken at a space, not inside a word
    best = str(tmp_path / "logs/charlm/version_0/checkpoints/best.ckpt")
    settings = ["--generate.max_new_tokens", "300", "--generate.seed", "5"]
    cmd = [CHARLM, "predict", "--ckpt_path", best, "--data.prompts", '["The king"]', *settings]
    reads = on_a_terminal(cmd, tmp_path)
    out = "".join(reads).replace("\r\n", "\n")
    expected = lightning_charlm.load(best).generate("The king", max_new_tokens=300, seed=5)
    assert out == "The king" + expected + "\n\n"
    assert len([r for r in reads if r.strip()]) >= 10  # streamed: many writes, not one at the end
    # Several prompts: a bar counting the characters generated, not the batches (here one, of two lengths).
    cmd = [CHARLM, "predict", "--ckpt_path", best, "--data.prompts", '["The", "king"]', *settings[:1], "800"]
    out = "".join(on_a_terminal(cmd, tmp_path, env=os.environ | {"COLUMNS": "80", "LINES": "24"}))
    counts = [
        int(n) for n in re.findall(r"characters\D+(\d+)/1600", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out))
    ]
    assert counts[-1] == 1600 and any(0 < n < 1600 for n in counts), counts
