"""The `charlm` command (also `python -m lightning_charlm`). The overview (`charlm`, `charlm --help`) is
printed without importing torch or Lightning, which take seconds; everything else is cli.main's."""

from __future__ import annotations

import os
import re
import signal
import sys
from contextlib import contextmanager

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
    with _unused_packages_left_out():
        from lightning_charlm.cli import main as run

    signal.signal(signal.SIGINT, signal.default_int_handler)
    run(args)


# Lightning imports torchmetrics, whose package import also imports these wherever they are installed, for
# text and image metrics charlm never computes: on the H100 image where they were measured, 11.3 s of 13.2 s
# of imports; and a torchvision built for another torch fails that import outright ("operator
# torchvision::nms does not exist"). CHARLM_IMPORT_ALL=1 imports them as usual (a module of your own that
# needs torchmetrics' BERTScore or LPIPS, say).
LEFT_OUT = ("transformers", "torchvision")


@contextmanager
def _unused_packages_left_out():
    """While charlm imports Lightning: the optional-package checks of lightning_utilities, which torchmetrics
    reads before importing one, answer "not installed" for LEFT_OUT. Each check keeps its answer."""
    if os.environ.get("CHARLM_IMPORT_ALL") == "1":
        yield
        return
    from lightning_utilities.core.imports import RequirementCache

    check = RequirementCache._check_available

    def leave_out(self) -> None:
        name = re.match(r"[\w.-]*", self.requirement or self.module or "").group(0)
        if not hasattr(self, "available") and name.split(".")[0] in LEFT_OUT:
            self.available, self.message = False, f"{name}: left out by charlm (CHARLM_IMPORT_ALL=1 keeps it)"
        check(self)

    RequirementCache._check_available = leave_out
    try:
        yield
    finally:
        RequirementCache._check_available = check


def _interrupted_while_importing(signum, frame) -> None:
    print("charlm: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # nothing is written before the imports end: nothing to clean up


if __name__ == "__main__":
    main()
