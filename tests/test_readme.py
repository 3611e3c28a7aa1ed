"""The README's commands, run as written (shrunk to a tiny GPT and a few steps), with the output it
promises."""

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


def readme_commands(section: str) -> list[list[str]]:
    """The `charlm` lines of the bash blocks under a `## section` heading, split as a shell would."""
    text = README.read_text(encoding="utf-8").split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith("charlm ")]


@needs_shakespeare
def test_the_usage_and_resume_commands_work_as_documented(tmp_path):
    shutil.copytree(README.parent / "configs", tmp_path / "configs")
    make_corpus(tmp_path).rename(tmp_path / "my_text.txt")
    usage, resume = readme_commands("Usage"), readme_commands("Resume and crash safety")
    assert len(usage) == 6 and len(resume) == 2, "the README's command lists changed: update this test"
    steps = iter(range(8, 100, 4))  # each fit trains 4 steps further (a resume needs a larger max_steps)
    for args in usage + resume:
        args = [a.replace("version_3", "version_0") for a in args[1:]]  # the README's example run number
        if args[0] == "fit" and "--print_config" not in args:
            args += [*SMALL, "--trainer.max_steps", str(next(steps) if "--ckpt_path" in args else 4)]
            args += SMALL_GPT if "configs/gpt.yaml" in args else ["--data.block_size", "32"]
        elif args[0] == "validate":
            args += ["--trainer.accelerator", "cpu"]
        elif args[0] == "predict":
            args += ["--generate.max_new_tokens", "20", "--trainer.accelerator", "cpu"]
        res = charlm_main(*args, cwd=tmp_path)
        assert res.returncode == 0, f"charlm {shlex.join(args)}:\n{res.stderr}"
        if args[0] == "predict":  # each prompt, continued by max_new_tokens characters, a blank line between
            records = res.stdout.split("\n\n")
            assert records[0].startswith("ROMEO:") and records[1].startswith("JULIET:")
            assert [len(r) for r in records[:2]] == [len("ROMEO:") + 20, len("JULIET:") + 20]
        elif args[0] == "validate":
            assert re.search(r"val/loss\s+│?\s*\d\.\d+", res.stdout)
        elif "--print_config" in args:
            assert "block_size: 256" in res.stdout and "n_layer: 6" in res.stdout
    # "Each run writes logs/<name>/version_N/ with the TensorBoard events, config.yaml, best.ckpt, last.ckpt"
    gpt, bigram = tmp_path / "logs/gpt/version_0", tmp_path / "logs/bigram/version_0"
    for run in (gpt, bigram):
        assert {"config.yaml", "checkpoints"} <= {p.name for p in run.iterdir()}
        assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert not (tmp_path / "logs/gpt/version_1").exists()  # every resume continued version_0
    # `tensorboard --logdir logs`: "train/loss, val/loss, val/ppl, val/bpc, lr, samples"
    ea = scalars(gpt)
    assert {"train/loss", "val/loss", "val/ppl", "val/bpc", "lr"} <= set(ea.Tags()["scalars"])
    assert max(e.step for e in ea.Scalars("train/loss")) == 15  # 4 steps, then three resumes of 4
    assert "samples/text_summary" in ea.Tags()["tensors"]
