"""The README's commands, run as written (shrunk to a tiny GPT and a few steps), with the output it
promises."""

import io
import json
import re
import shlex
import shutil
from pathlib import Path

from tests.conftest import charlm_main, make_corpus, needs_shakespeare
from tests.test_cli import scalars

README = Path(__file__).resolve().parents[1] / "README.md"
# Appended to every fit and validate: the configs' own model at a size two CPU cores train in seconds.
SMALL_GPT = [
    "--model.n_layer",
    "1",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "32",
    "--model.block_size",
    "32",
]
SMALL = ["--data.batch_size", "8", "--data.val_batch_size", "512", "--trainer.val_check_interval", "4"]
SMALL += [
    "--trainer.log_every_n_steps",
    "1",
    "--sample.every_n_steps",
    "4",
    "--generate.max_new_tokens",
    "10",
]
SMALL += ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def readme_section(section: str) -> str:
    return README.read_text(encoding="utf-8").split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]


def readme_commands(section: str) -> list[tuple[str | None, list[str]]]:
    """The `charlm` lines of the bash blocks under a `## section` heading, split as a shell would, each with
    the text an `echo "TEXT" |` before it pipes in (else None)."""
    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)```", readme_section(section), re.S)
        for line in block.splitlines()
    ]
    commands = []
    for line in lines:
        piped = re.match(r'echo "([^"]*)" \| (charlm .*)', line)
        if line.startswith("charlm ") or piped:
            commands.append(
                (
                    piped.group(1) + "\n" if piped else None,
                    shlex.split(piped.group(2) if piped else line, comments=True),
                )
            )
    return commands


@needs_shakespeare
def test_the_readme_commands_work_as_documented(tmp_path, monkeypatch, capsys, caplog):
    shutil.copytree(README.parent / "configs", tmp_path / "configs")
    make_corpus(tmp_path).rename(tmp_path / "my_text.txt")
    usage, resume = readme_commands("Usage"), readme_commands("Resume and crash safety")
    generation = readme_commands("Generation")
    assert [len(usage), len(resume), len(generation)] == [6, 2, 3], (
        "the README's commands changed: update this test"
    )
    steps = iter(range(8, 100, 4))  # each fit trains 4 steps further (a resume needs a larger max_steps)
    for stdin, args in usage + resume + generation:
        args = [a.replace("version_3", "version_0") for a in args[1:]]  # the README's example run number
        if args[0] == "fit" and "--print_config" not in args:
            args += [*SMALL, "--trainer.max_steps", str(next(steps) if "--ckpt_path" in args else 4)]
            args += SMALL_GPT if "configs/gpt-cpu.yaml" in args else ["--data.block_size", "32"]
        elif args[0] == "validate":
            args += ["--trainer.accelerator", "cpu"]
        elif args[0] == "predict":
            args += ["--trainer.accelerator", "cpu"]
            args += [] if "--generate.max_new_tokens" in args else ["--generate.max_new_tokens", "20"]
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        res = charlm_main(*args, cwd=tmp_path)
        assert res.returncode == 0, f"charlm {shlex.join(args)}:\n{res.stderr}"
        if "jsonl" in args:  # the piped prompt, as one JSON record
            assert [json.loads(line)["prompt"] for line in res.stdout.splitlines()] == [stdin.strip()]
        elif args[0] == "predict":  # each prompt continued by max_new_tokens characters, a blank line between
            prompts = json.loads(args[args.index("--data.prompts") + 1]) if "--data.prompts" in args else [""]
            n = int(args[args.index("--generate.max_new_tokens") + 1])
            assert len(res.stdout) == sum(len(p) + n + 2 for p in prompts)
            assert res.stdout.startswith(prompts[0]) and res.stdout[len(prompts[0]) + n :].startswith("\n\n")
        elif args[0] == "validate":
            assert re.search(r"val/loss\s+│?\s*\d\.\d+", res.stdout)
        elif "--print_config" in args:
            assert "block_size: 128" in res.stdout and "n_layer: 3" in res.stdout  # gpt-cpu.yaml's
    # "Each run writes logs/<name>/version_N/ with the TensorBoard events, config.yaml, best.ckpt, last.ckpt"
    gpt, bigram = tmp_path / "logs/gpt-cpu/version_0", tmp_path / "logs/bigram/version_0"
    for run in (gpt, bigram):
        assert {"config.yaml", "checkpoints"} <= {p.name for p in run.iterdir()}
        assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert not (tmp_path / "logs/gpt-cpu/version_1").exists()  # every resume continued version_0
    # "a checkpoint alone is enough to generate text": whichever model it holds, none named
    caplog.clear()
    for cmd in (["validate"], ["predict", "--generate.max_new_tokens", "5"]):
        res = charlm_main(*cmd, "--ckpt_path", str(bigram / "checkpoints/best.ckpt"), cwd=tmp_path)
        assert res.returncode == 0 and "not used" not in caplog.text, res.stderr
    # `tensorboard --logdir logs`: "train/loss, val/loss, val/ppl, val/bpc, lr, samples"
    ea = scalars(gpt)
    assert {"train/loss", "val/loss", "val/ppl", "val/bpc", "lr"} <= set(ea.Tags()["scalars"])
    assert max(e.step for e in ea.Scalars("train/loss")) == 15  # 4 steps, then three resumes of 4
    assert "samples/text_summary" in ea.Tags()["tensors"]
    # The Python example, as printed, against the run made above
    code = re.search(r"```python\n(.*?)```", readme_section("Generation"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(code.replace("max_new_tokens=200", "max_new_tokens=20"), {})
    printed = capsys.readouterr().out
    assert len(printed) == 20 + 1 + 20  # generate's line, then the streamed characters
