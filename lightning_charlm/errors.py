"""The one exception type for mistakes a user can fix, and which other errors are the user's too: the CLI
prints them as one line, without a traceback."""

from __future__ import annotations

import re

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException


class CharLMError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


def _causes(err: BaseException):
    # jsonargparse re-raises errors from a class's __init__ inside its own ValueError: look down the chain.
    while err is not None:
        yield err
        err = err.__cause__


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error the user's options, files or machine caused, or None for a bug."""
    for cause in _causes(err):
        if isinstance(cause, CharLMError):
            return str(cause)
        if isinstance(cause, MisconfigurationException):  # Lightning's own checks of the trainer options
            return str(cause).strip().splitlines()[0]
        text = str(cause)
        oom = isinstance(cause, RuntimeError) and "can't allocate memory" in text  # the CPU allocator's
        if oom or isinstance(cause, MemoryError | torch.OutOfMemoryError):
            return f"out of memory ({text.splitlines()[0][:200]}): use a smaller model, batch or block size"
        if isinstance(cause, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
            return (
                "the checkpoint's weights do not fit the model its hyperparameters describe "
                f"({text.splitlines()[1].strip()[:200]}): it was edited or written by other code"
            )
    return None


TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "text",
    "list": "a list",
}


def expected_in_words(lines: list[str]) -> str | None:
    """jsonargparse's "Expected a <class 'int'>. Got value: ten" (or a Union's list of them) in words:
    "expected an integer, got ten"; choices named: "expected one of char, byte, got bytes"."""
    wanted, value = [], None
    for line in lines:
        match = re.match(r"Expected a (.+?)(?:\. Got value: (.*))?$", line.lstrip("- "))
        if match:
            kind = match.group(1)
            choices, cls = re.match(r"typing\.Literal\[(.*)\]$", kind), re.match(r"<class '(\w+)'>$", kind)
            word = f"one of {choices.group(1).replace(chr(39), '')}" if choices else kind
            word = TYPE_WORDS.get(cls.group(1), cls.group(1)) if cls else word
            if "NoneType" not in kind and word not in wanted:
                wanted.append(word)
            value = match.group(2) if value is None else value  # the innermost, found first
        elif line.startswith("Given value:") and value is None:
            value = line.split(":", 1)[1].strip()
    if not wanted:
        return None
    return f"expected {' or '.join(wanted)}" + (f", got {value}" if value is not None else "")
