"""charlm's own lines (the run summary, where a run stopped and saved, errors): on a terminal broken between
words at its width, since a terminal breaks a long line wherever the width ends, mid-word; in a file or a
pipe one line each, for whoever reads them as records."""

from __future__ import annotations

import shutil
import sys
import textwrap
from typing import TextIO


def say(text: str, file: TextIO | None = None) -> None:
    file = file or sys.stdout
    if file.isatty():
        width = shutil.get_terminal_size().columns
        text = "\n".join(
            textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False) or line
            for line in text.splitlines()
        )
    print(text, file=file, flush=True)
