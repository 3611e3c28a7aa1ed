"""What the command line shows and says: which options `--help` lists for each subcommand and in whose
words, and the one `charlm: error:` line a bad option becomes (not jsonargparse's usage and nested report)."""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
import textwrap
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lightning_charlm.console import say
from lightning_charlm.errors import CharLMError, expected_in_words
from lightning_charlm.module import GPTLM


class CharLMParser(LightningArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --data.pa is a typo, not --data.path

    def format_help(self) -> str:
        # UNLISTED options are hidden from --help only: an action's help set to SUPPRESS would also drop
        # its value from --print_config and the run's config.yaml.
        unlisted = getattr(self, "unlisted", UNLISTED)
        hidden = [a for a in self._actions if a.dest in unlisted and a.help is not argparse.SUPPRESS]
        shown = [a.help for a in hidden]
        for action in hidden:
            action.help = argparse.SUPPRESS
        try:
            return super().format_help()
        finally:
            for action, text in zip(hidden, shown, strict=True):
                action.help = text

    def error(self, message: str, ex: Exception | None = None):
        """A bad option: one `charlm: error:` line naming it (with a guess for a misspelt one), then where
        to find them all; not jsonargparse's usage and nested union report."""
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        say(f"charlm: error: {_one_line(str(message), parser)}", sys.stderr)
        print(f"every option: {prog} --help", file=sys.stderr)
        sys.exit(2)


def _one_line(message: str, parser: LightningArgumentParser) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    # jsonargparse nests the reason under 'Parser key "group":' headers: keep the outer and inner key.
    keys = [re.match(r'Parser key "(.+)":', line).group(1) for line in lines if line.startswith("Parser key")]
    key = "--" + ".".join(dict.fromkeys([keys[0], keys[-1]])) if keys else None
    unknown = re.match(r"unrecognized arguments: (\S+)", lines[0], re.IGNORECASE)
    inner = next(
        (re.search(r"Option '(\S+)' is not accepted", line) for line in lines if "not accepted" in line), None
    )
    if unknown or inner:
        option = unknown.group(1).split("=")[0] if unknown else f"{key}.{inner.group(1)}"
        if option == "-":
            return "unknown argument -: to read prompts from standard input, pass --data.prompts_file -"
        known = [s for action in parser._actions for s in action.option_strings]
        known += [f"--model.{k}" for k in inspect.signature(GPTLM).parameters]  # the default model's
        if option in known:  # another model's option (--model.n_layer for the bigram)
            return (
                f"{option} is not an option of the chosen model; `charlm fit --model.help NAME` lists its own"
            )
        guess = difflib.get_close_matches(option, known, n=1)
        return f"unknown option {option}" + (f" (did you mean {guess[0]}?)" if guess else "")
    not_a_class = re.search(r"Expected a dot import path string: (\S+)", message)
    if not_a_class and (key == "--model" or message.startswith("--model.help")):
        return (
            f"{key or '--model.help'} {not_a_class.group(1)}: no such model; the models are GPTLM and "
            "BigramLM (or the dotted path of your own LightningModule, my_package.MyLM)"
        )
    odd = re.match(r"\s*Unexpected config:(.*)", message, re.DOTALL)  # a -c file that is not a mapping
    if odd:
        held = odd.group(1).strip()
        what = repr(held if len(held) <= 40 else held[:37] + "...") if held else "nothing (an empty file)"
        return (
            f"a -c config must hold options, `key: value` one per line (as configs/*.yaml); it holds {what}"
        )
    missing = re.search(r"File does not exist: '(.+)'", message)
    if key == "--config" and missing:
        return f"config file not found: {missing.group(1)}"
    reason = expected_in_words(lines) or next(
        (line for line in lines if line.startswith("Expected")), lines[-1]
    )
    return f"{key}: {reason}{LIST_HINTS.get(key, '')}" if key else lines[0]


PREDICT_ONLY = ("data.prompts", "data.prompts_file", "data.num_samples")
# What predict does not read: it continues prompts with the checkpoint's model and vocabulary, no corpus.
NOT_PREDICT = tuple(
    f"data.{name}"
    for name in ("path", "unit", "split", "block_size", "val_stride", "val_batch_size", "seed", "on_device")
) + ("seed_everything", "trainer.limit_val_batches", "trainer.limit_test_batches")
NOT_EVALUATE = ("data.seed", "data.batch_size", "data.on_device")  # validate and test: training windows only
TRAINING_ONLY = (
    "max_steps", "min_steps", "max_time", "val_check_interval", "log_every_n_steps",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "num_sanity_val_steps",
    "detect_anomaly", "fast_dev_run",
)  # fmt: skip
# Accepted (a config may hold them) but not listed by --help: ModelCheckpoint's, which charlm sets so that
# a run keeps best.ckpt and last.ckpt, and the Trainer's that have no use here (training counts steps in one
# endless epoch; the datamodule shards the data itself; RunSummary replaces the model summary).
UNLISTED = tuple(
    f"checkpoint.{name}"
    for name in (
        "filename", "monitor", "mode", "save_last", "save_top_k", "auto_insert_metric_name",
        "enable_version_counter", "every_n_epochs", "every_n_train_steps", "train_time_interval",
        "save_on_train_epoch_end", "save_on_exception", "save_weights_only", "verbose",
    )
) + ("early_stopping.mode", "early_stopping.check_on_train_epoch_end") + tuple(
    f"trainer.{name}"
    for name in (
        "max_epochs", "min_epochs", "check_val_every_n_epoch", "reload_dataloaders_every_n_epochs",
        "use_distributed_sampler", "overfit_batches", "limit_train_batches", "limit_predict_batches",
        "enable_model_summary", "enable_checkpointing", "default_root_dir", "model_registry",
        "enable_autolog_hparams", "sync_batchnorm", "barebones", "inference_mode",
    )
)  # fmt: skip
LIST_HINTS = {  # options that take a list, where jsonargparse's reason does not say so
    "--data.prompts": """ (a list, in JSON: '["ROMEO:", "JULIET:"]')""",
    "--data.split": " (a list of 2 or 3 fractions, in JSON: [0.9,0.1] or [0.9,0.05,0.05])",
}


SUBCOMMAND_HELP = {
    "early_stopping.patience": "validation rounds without improvement of val/loss before training stops.",
    "early_stopping.monitor": "the metric early stopping watches (default val/loss).",
    "ckpt_path": "a checkpoint: fit resumes it in its own run folder (every state restored); validate, test "
    "and predict use its model, which also makes its --model options the ones used. `last`: the newest "
    "logs/<name>/version_N/checkpoints/last.ckpt of this config's logger name, trained on a corpus of this "
    "file name.",
    "trainer.val_check_interval": "validate every this many optimizer steps (and at the last step).",
    "trainer.max_steps": "optimizer steps to train; the learning rate decays until then.",
    "trainer.log_every_n_steps": "write train/loss, lr and train/grad_norm every this many steps (null: 50).",
    "trainer.gradient_clip_val": "clip the gradients' norm to this (by value with "
    "--trainer.gradient_clip_algorithm value); 0 turns clipping off.",
    "trainer.num_sanity_val_steps": "validation batches tried before training (none by default).",
    "checkpoint.dirpath": "where best.ckpt and last.ckpt go (default: the run folder's checkpoints/, or "
    "./checkpoints without a logger). A folder holding another run's checkpoints is refused, unless this run "
    "resumes from one of them; `--ckpt_path last` then means its last.ckpt.",
    "weights_only": "checkpoints are loaded as tensors and primitives only (true; false is refused): a file "
    "holding other objects is refused, never unpickled.",
}


def describe_options(parser: LightningArgumentParser, subcommand: str) -> None:
    """A subcommand's parser as `--help` shows it: this project's words for its options and groups, and what
    the subcommand does not read hidden (still accepted: a config may hold it)."""
    for action in parser._actions:  # Lightning's generic text says little about what they mean here
        if action.dest == "early_stopping.monitor":  # EarlyStopping's own has no default; charlm's has
            action.required = False
        if action.dest in SUBCOMMAND_HELP:
            action.help = SUBCOMMAND_HELP[action.dest]
        elif action.dest in ("data.vocab", "return_predictions"):  # filled in; no use to a command
            action.help = argparse.SUPPRESS
        elif subcommand != "predict" and (
            action.dest in PREDICT_ONLY or action.dest.split(".")[0] == "writer"
        ):
            action.help = argparse.SUPPRESS  # accepted (a config may hold them), but not listed
    for group in parser._action_groups:  # the Trainer method's own group: its docstring is cut short
        if any(action.dest == "ckpt_path" for action in group._group_actions):
            group.title, group.description = f"charlm {subcommand}", None
        if group.title and group.title.startswith("Customize every aspect of training"):
            group.title = "Lightning's Trainer: the devices, precision, logger and loop"
        if subcommand != "fit" and group.title and group.title.startswith("The model to train"):
            group.title = "The model: the checkpoint's (--ckpt_path), as it was trained"
        if group.title and len(group.title) >= 80:  # a class docstring's first line: an 80-column terminal
            group.title = textwrap.fill(group.title, 79)
    # Not the generated usage (every option in brackets, 70 lines, some wider than a terminal): the options
    # are listed below it.
    parser.usage = f"charlm {subcommand} [-c CONFIG] [options]"
    if subcommand != "fit":  # what only training reads: accepted (a config may hold it), not listed
        parser.unlisted = {
            action.dest
            for action in parser._actions
            if action.dest.split(".")[0] in ("checkpoint", "early_stopping", "sample")
            or action.dest in (*UNLISTED, *(f"trainer.{name}" for name in TRAINING_ONLY))
            or (subcommand == "predict" and action.dest in NOT_PREDICT)
            or (subcommand != "predict" and action.dest in NOT_EVALUATE)
            or (subcommand != "predict" and action.dest.split(".")[0] == "generate")
        }


SECTIONS = ("trainer", "data", "model", "checkpoint", "early_stopping", "sample", "writer", "generate")


def check_config_sections(configs: list | None) -> None:
    """Each section of the -c files (trainer:, data:, ...) must hold options. Given a number or a list
    instead, jsonargparse keeps it (and the run fails later with a traceback) or, when a --trainer.* option
    follows, drops it without a word."""
    for path in configs or []:
        if path is None:  # a config given as a string, not a file: parsed as the file's would be
            continue
        try:
            content = yaml.safe_load(path.get_content())
        except (OSError, yaml.YAMLError):  # jsonargparse has read and parsed it already
            continue
        for key, value in content.items() if isinstance(content, dict) else ():
            if (
                key in SECTIONS
                and not isinstance(value, dict)
                and not (key == "model" and isinstance(value, str))
            ):
                raise CharLMError(
                    f"{path}: the `{key}:` section must hold options, one per line indented below it (as in "
                    f"configs/gpt-cpu.yaml), got {value!r}"
                )
