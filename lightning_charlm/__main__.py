"""The `charlm` command (also `python -m lightning_charlm`). The overview (`charlm`, `charlm --help`) is
printed without importing torch or Lightning, which take seconds; everything else is cli.main's."""

from __future__ import annotations

import os
import signal
import sys

SUBCOMMANDS = {
    "fit": "train a model, or resume one with --ckpt_path (a file, or `last`)",
    "validate": "score a checkpoint on held-out text: val/loss, val/ppl, val/bpc",
    "test": "score a checkpoint on its test part (--data.split [.9,.05,.05])",
    "predict": "generate text from a checkpoint alone (--ckpt_path, --data.prompts)",
}

_LINES = "".join(f"  {name:<10}{text}\n" for name, text in SUBCOMMANDS.items())
OVERVIEW = f"""usage: charlm {{{",".join(SUBCOMMANDS)}}} [-c CONFIG] [options]

Train and sample character-level language models.

subcommands:
{_LINES}
examples:
  charlm fit -c configs/gpt-cpu.yaml
  charlm fit -c configs/gpt-cpu.yaml --ckpt_path last
  charlm validate --ckpt_path logs/gpt-cpu/version_0/checkpoints/best.ckpt
  charlm predict --ckpt_path logs/gpt-cpu/version_0/checkpoints/best.ckpt \\
      --data.prompts '["ROMEO:"]'

every option: charlm fit --help; a model's: charlm fit --model.help GPTLM"""


def main(args: list[str] | None = None) -> None:
    given = sys.argv[1:] if args is None else list(args)
    if given in (["-h"], ["--help"]):
        print(OVERVIEW)
        return
    if not given:
        print(OVERVIEW, file=sys.stderr)
        sys.exit(2)
    # A Ctrl-C while torch and Lightning import (seconds) ends at once, as a later one does: an exception
    # raised inside an import can leave a module half made and surface as another error's traceback.
    signal.signal(signal.SIGINT, _interrupted_while_importing)
    from lightning_charlm.cli import main as run

    signal.signal(signal.SIGINT, signal.default_int_handler)
    run(args)


def _interrupted_while_importing(signum, frame) -> None:
    print("charlm: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # nothing is written before the imports end: nothing to clean up


if __name__ == "__main__":
    main()
