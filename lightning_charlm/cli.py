"""`charlm`: a LightningCLI with the vocabulary linked from data to model, house defaults and clean errors."""

from __future__ import annotations

import importlib
import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_charlm.__main__ import SUBCOMMANDS
from lightning_charlm.callbacks import RunSummary, SampleText, StepProgressBar, TokensPerSecond
from lightning_charlm.checkpointing import SAVED_ON_SIGNAL, Checkpoint
from lightning_charlm.console import say
from lightning_charlm.corpus import found_here
from lightning_charlm.data import DEFAULT_SPLIT, CharDataModule, check_unit, window_length
from lightning_charlm.errors import CharLMError, user_error
from lightning_charlm.module import CharLM, legacy_options
from lightning_charlm.options import NOT_PREDICT, CharLMParser, check_config_sections, describe_options
from lightning_charlm.runs import (
    RUNTIME_OPTIONS,
    SHAPE_OPTIONS,
    RunFolder,
    check_checkpoint,
    continue_run,
    corpus_of,
    model_given,
    newest_last_checkpoint,
    own_checkpoint_folder,
    resume_conflicts,
    same_corpus,
    unheld_test_text,
)
from lightning_charlm.sampling import GenerationConfig
from lightning_charlm.writer import WRITTEN_ON_SIGNAL, PredictionWriter

log = logging.getLogger(__name__)


def default_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


class SaveRunConfig(SaveConfigCallback):
    """config.yaml goes beside a run's TensorBoard events. Without a logger Lightning would write it to the
    working directory, over any config.yaml already there, so then (and for predict) it is not written."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None and stage != "predict":
            super().setup(trainer, pl_module, stage)


DEFAULT_MODEL = "lightning_charlm.GPTLM"


class CharLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The vocabulary is read from the corpus in CharDataModule and handed to whichever model is chosen.
        parser.link_arguments("data.vocab", "model.init_args.vocab", apply_on="instantiate")
        # Callbacks every run has, with flat keys (--early_stopping.patience 3) instead of a callbacks list.
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(SampleText, "sample")
        parser.add_lightning_class_args(PredictionWriter, "writer")
        parser.add_class_arguments(GenerationConfig, "generate")  # predict's and the samples' settings
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,  # "val/loss" would make folders
                "checkpoint.enable_version_counter": False,  # always best.ckpt, last.ckpt (atomic replace)
                "early_stopping.monitor": "val/loss",
                "early_stopping.mode": "min",
                "early_stopping.patience": 5,  # validation rounds without improvement
            }
        )

    def __init__(self, *args: Any, **kwargs: Any):
        given = kwargs.get("args")
        given = sys.argv[1:] if given is None else given
        first = given[0] if isinstance(given, list) and given else None
        self._only = first if first in self.subcommands() else None
        lead = [first] if self._only else []  # run=False (tests, benchmarks) parses without a subcommand
        # Whether the user named a model (the default put in below is not one: with --ckpt_path the
        # checkpoint's class is used, whichever it is), and which model options they set by name.
        self._model_named, self._model_options = (
            model_given(given[len(lead) :]) if isinstance(given, list) else (False, set())
        )
        self._options_given = {  # on the command line, by name: predict says which of them it does not read
            arg[2:].split("=", 1)[0]
            for arg in (given if isinstance(given, list) else [])
            if arg.startswith("--")
        }
        if (self._only or kwargs.get("run") is False) and not self._model_named:
            # The model to train when none is named (with --ckpt_path the checkpoint's class wins). Not a
            # parser default: jsonargparse hands a default class's init_args to a class named later where
            # it accepts them, and the bigram trained with the GPT's lr, warmup and weight decay.
            named = [*lead, "--model", DEFAULT_MODEL, *given[len(lead) :]]
            if kwargs.get("args") is None:
                sys.argv[1:] = named  # where Lightning reads them (it warns when given both)
            else:
                kwargs["args"] = named
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's, building only the parser of the subcommand asked for (when one is): each parser
        reads every class signature, about 0.3 s apiece, at every launch."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            if self._only not in (None, name):
                continue
            description = SUBCOMMANDS[name]  # charlm's words: Lightning's docstrings are cut mid-sentence
            sub_kwargs = {"description": description, **kwargs.get(name, {})}
            self._subcommand_parsers[name] = self._prepare_subcommand_parser(L.Trainer, name, **sub_kwargs)
            subcommands.add_subcommand(name, self._subcommand_parsers[name], help=description)

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        describe_options(parser, subcommand)
        return parser

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the checkpoint's hyperparameters into the model config here. Before that: resolve
        `last` to the newest run of this config, resume into that run's folder, and turn every way a
        checkpoint can fail into a clear message naming the file (loading with weights_only=True)."""
        if not self.config.get("subcommand"):
            return
        cfg = self.config[self.config.subcommand]
        check_config_sections(cfg.get("config"))
        if cfg.get("weights_only") is False:  # every load here is weights-only: the option cannot turn it off
            raise CharLMError(
                "--weights_only false: charlm loads checkpoints as tensors and primitives only, never "
                "unpickling code; leave the option out"
            )
        cfg.weights_only = True  # checkpoints hold tensors and primitives only; never unpickle code
        own = own_checkpoint_folder(
            cfg.checkpoint.dirpath, cfg.trainer.logger is not False, cfg.trainer.default_root_dir
        )
        if cfg.ckpt_path == "last" and own is not None:  # a checkpoint folder of the user's own
            if not (own / "last.ckpt").is_file():
                raise CharLMError(f"--ckpt_path last: there is no last.ckpt in {own}")
            cfg.ckpt_path = str(own / "last.ckpt")
        elif cfg.ckpt_path == "last":
            fitting = self.config.subcommand == "fit"
            cfg.ckpt_path = str(newest_last_checkpoint(cfg.trainer.logger, cfg.data.path, fitting))
        if not cfg.ckpt_path and self.config.subcommand in ("validate", "test", "predict"):
            raise CharLMError(
                f"{self.config.subcommand} needs a trained model: pass --ckpt_path "
                "logs/NAME/version_N/checkpoints/best.ckpt (or `last`)"
            )
        if not cfg.ckpt_path:
            return
        ckpt = check_checkpoint(cfg.ckpt_path)
        if cfg.data.path is None and self.config.subcommand != "predict":
            cfg.data.path = corpus_of(ckpt)  # the corpus it was trained on, unless another is named
            if not found_here(cfg.data.path):
                raise CharLMError(
                    f"{cfg.ckpt_path} was trained on --data.path {cfg.data.path}, not found from this folder "
                    "(a relative path counts from where it was trained): run from there, or pass --data.path"
                )
        trained = ckpt.get("datamodule_hyper_parameters") or {}
        for key in ("split", "unit"):  # and its split (validate and test score what it held out) and unit
            if cfg.data.get(key) is None:
                cfg.data[key] = trained.get(key)
        trained_split = list(trained.get("split") or DEFAULT_SPLIT)  # None: the default, no test part
        same_text = trained and same_corpus(cfg.data.path, corpus_of(ckpt))  # its split is then comparable
        testing, validating = (same_text and self.config.subcommand == kind for kind in ("test", "validate"))
        seen = unheld_test_text(trained_split, cfg.data.split) if testing else None
        if seen:
            log.warning(
                "charlm: warning: the test part (the last %g%% of the corpus, --data.split %s) is text this "
                "model was %s (it trained with --data.split %s): its test loss is not a held-out figure",
                *(round(cfg.data.split[2] * 100, 2), list(cfg.data.split), seen, trained_split),
            )
        if validating and cfg.data.split and cfg.data.split[0] < trained_split[0] - 1e-9:
            log.warning(
                "charlm: warning: the validation part (from %g%% of the corpus, --data.split %s) starts in "
                "text this model trained on (it trained with --data.split %s): its val/loss is not a "
                "held-out figure",
                *(round(cfg.data.split[0] * 100, 2), list(cfg.data.split), trained_split),
            )
        step = ckpt.get("global_step", 0)
        if self.config.subcommand == "fit":
            if 0 <= cfg.trainer.max_steps <= step:
                raise CharLMError(
                    f"{cfg.ckpt_path} is at step {step} already: --trainer.max_steps {cfg.trainer.max_steps} "
                    "would train nothing; give a larger --trainer.max_steps to go on"
                )
            continue_run(cfg.trainer.logger, Path(cfg.ckpt_path))
            was = trained.get("block_size")
            if cfg.data.block_size is not None and was is not None and cfg.data.block_size != was:
                log.warning(
                    "charlm: resuming with --data.block_size %d (the run trained on windows of %d): val/loss "
                    "is now scored on other windows, so best.ckpt compares losses of two kinds",
                    *(cfg.data.block_size, was),
                )
            last = Path(cfg.ckpt_path).with_name("last.ckpt")
            if last != Path(cfg.ckpt_path) and last.is_file():  # e.g. from best.ckpt, behind the run's end
                later = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get(
                    "global_step", 0
                )
                if later > step:
                    log.warning(
                        "charlm: resuming at step %d (%s): the run's last.ckpt, at step %d, will be replaced",
                        *(step, Path(cfg.ckpt_path).name, later),
                    )
        asked = cfg.model.class_path if self._model_named else None
        asked_args = dict(cfg.model.get("init_args") or {})
        super()._parse_ckpt_path()  # replaces the model config with the checkpoint's
        model = self.config[self.config.subcommand].model
        if model.class_path.endswith("GPTLM"):  # options newer than the checkpoint: as it was built
            for key, value in legacy_options(ckpt["hyper_parameters"]).items():
                model.init_args[key] = value
        if asked and _resolve(model.class_path) is not _resolve(asked):
            raise CharLMError(
                f"{cfg.ckpt_path} holds a {model.class_path.rsplit('.', 1)[-1]} but the config asks for a "
                f"{asked.rsplit('.', 1)[-1]}: use the config it was trained with, or leave the model out"
            )
        if asked and self.config.subcommand == "fit":  # validate and predict only read the model
            conflicts = resume_conflicts(model.class_path, asked_args, model.init_args)
            if conflicts:
                raise CharLMError(
                    f"{cfg.ckpt_path} holds a model with other options than this command asks for (on its "
                    f"command line or in its -c config): {'; '.join(conflicts)}. The checkpoint's options "
                    "are the ones it can use: resume with the run's own config "
                    f"(-c {Path(cfg.ckpt_path).parent.parent / 'config.yaml'}) or drop these options, or "
                    "start a new run without --ckpt_path"
                )
            for key in RUNTIME_OPTIONS:  # how to run it: the command line's choice stands
                if key in asked_args:
                    model.init_args[key] = asked_args[key]
        elif self.config.subcommand != "fit" and self._model_options:
            # validate, test and predict use the model as it was trained: say which options it leaves unused
            shape = tuple(k for k in SHAPE_OPTIONS if k in self._model_options)
            unused = shape and resume_conflicts(model.class_path, asked_args, model.init_args, shape)
            if unused:
                log.warning(
                    "charlm: %s is used as it was trained; not used: %s", cfg.ckpt_path, "; ".join(unused)
                )
        unread = [f"--{name}" for name in NOT_PREDICT if name in self._options_given]
        if self.config.subcommand == "predict" and unread:  # a config file's are its training settings
            log.warning(
                "charlm: predict continues the prompts with the checkpoint's model and vocabulary (the "
                "sampling seed is --generate.seed); not used: %s",
                ", ".join(unread),
            )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # Added here, not in the defaults: Lightning refuses a bar callback with enable_progress_bar=False.
        # predict's, validate's and test's output is stdout itself (texts, the metrics): a bar there only
        # when it is a terminal, not a pipe or a file, and not for a single prompt, whose text streams to
        # the terminal (a live bar would break it up).
        if self.subcommand in ("predict", "validate", "test") and (
            not sys.stdout.isatty()
            or (self.subcommand == "predict" and len(self.datamodule.prompt_list()) == 1)
        ):
            config["enable_progress_bar"] = False
        if config.get("enable_progress_bar") is not False:
            callbacks = [StepProgressBar(), *callbacks]  # first: step N shown before step N's sample
        for name, (valid, wanted) in TRAINER_CHECKS.items():
            value = config.get(name)
            if value is not None and not valid(value):
                raise CharLMError(f"--trainer.{name} must be {wanted}, got {value}")
        trainer = super()._instantiate_trainer(config, callbacks)
        fp16 = str(config.get("precision")) in ("16-mixed", "16")
        if fp16 and trainer.precision == "bf16-mixed" and trainer.is_global_zero:  # Lightning's, off CUDA
            note = "--trainer.precision 16-mixed is for CUDA GPUs; this run uses bf16-mixed"
            say(f"charlm: note: {note}", sys.stderr)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        self.run_folder: RunFolder | None = None
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:  # refused, crashed or interrupted (Ctrl-C at start-up is a SystemExit)
            if self.run_folder is not None:
                self.run_folder.discard_if_empty()
            caught_ctrl_c = type(err) is SystemExit and self.trainer.state.status == TrainerStatus.INTERRUPTED
            if caught_ctrl_c:  # Lightning turned a Ctrl-C into exit(1): main() says so, and exits 130
                raise KeyboardInterrupt from None
            raise
        finally:
            if self.run_folder is not None:
                self.run_folder.release()

    def before_fit(self) -> None:
        # Everything that can refuse the run is checked before anything is written to its folder.
        self.model.check_data(self.datamodule)
        for group, kind in (("checkpoint", Checkpoint), ("early_stopping", EarlyStopping)):
            for c in (c for c in self.trainer.callbacks if isinstance(c, kind) and c.monitor is not None):
                if c.monitor not in CharLM.VAL_METRICS:  # Lightning would find out after the first validation
                    raise CharLMError(
                        f"--{group}.monitor {c.monitor}: not a metric of every validation; "
                        f"choose {', '.join(CharLM.VAL_METRICS)}"
                    )
        for sampler in (c for c in self.trainer.callbacks if isinstance(c, SampleText) and c.every_n_steps):
            try:  # now, not when the first sample is due, after minutes of training
                self.model.tokenizer.encode(sampler.prompt)
            except CharLMError as err:
                raise CharLMError(f"--sample.prompt {sampler.prompt!r} cannot be sampled: {err}") from None
        self._check_checkpoint_folder()
        log_dir = self.trainer.log_dir  # without a logger, the working folder: no run folder to hold
        if self.trainer.logger is not None and log_dir is not None and self.trainer.is_global_zero:
            try:
                self.run_folder = RunFolder(Path(log_dir))
                tempfile.TemporaryFile(dir=log_dir).close()
            except OSError as err:
                raise CharLMError(
                    f"cannot write the run folder {log_dir} ({err.strerror}); make the logs folder writable "
                    "or choose another with --trainer.logger.init_args.save_dir"
                ) from None

    def _check_checkpoint_folder(self) -> None:
        """A folder of its own for best.ckpt and last.ckpt: --checkpoint.dirpath, or ./checkpoints without a
        logger (a run folder under the logger is new, or the resumed run's own). One that holds another
        run's checkpoints is refused: this run would replace its best.ckpt whatever the losses."""
        callback = self.trainer.checkpoint_callback
        if callback is None:
            return
        folder = own_checkpoint_folder(
            callback.dirpath, self.trainer.logger is not None, self.trainer.default_root_dir
        )
        if folder is None:
            return  # logs/<name>/version_N/checkpoints: RunFolder checks it
        ckpt_path = self.config.fit.ckpt_path
        resuming_here = ckpt_path is not None and Path(ckpt_path).resolve().parent == folder.resolve()
        held = [name for name in ("best.ckpt", "last.ckpt") if (folder / name).exists()]
        if held and not resuming_here:
            raise CharLMError(
                f"{folder} holds the {' and '.join(held)} of another run, which this run would replace: "
                f"resume it with --ckpt_path {folder / held[-1]}, or give this run another"
                " --checkpoint.dirpath"
            )
        try:  # fail now, not after training: a missing folder is made, a file in the way is an error
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise CharLMError(
                f"cannot write the checkpoint folder {folder} ({err.strerror or err})"
            ) from None

    def before_validate(self) -> None:
        self.model.check_data(self.datamodule)

    def before_test(self) -> None:
        self.model.check_data(self.datamodule)

    def before_predict(self) -> None:
        # Every prompt is checked before any is generated: a bad one in a later batch would otherwise fail
        # after minutes of work, and the earlier continuations would be lost with it.
        for prompt in dict.fromkeys(self.datamodule.prompt_list()):  # each once, num_samples copies aside
            try:
                self.model.tokenizer.encode(prompt)
            except CharLMError as err:  # which prompt, among many in a file
                shown = repr(prompt) if len(prompt) <= 40 else f"{prompt[:37]!r}..."
                raise CharLMError(f"prompt {shown}: {err}") from None

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config  # run=False has no subcommand
        self.ckpt_vocab = cfg.model.init_args.get("vocab")  # only present when read from a checkpoint
        if self.ckpt_vocab and self.subcommand != "predict":  # before the corpus is read in the wrong unit
            check_unit(self.ckpt_vocab, cfg.data.unit)
        if self.subcommand in ("predict", "validate", "test"):
            # validate and test print their metrics; a logger would only leave a new, nearly empty run folder
            cfg.trainer.logger = False
        if cfg.data.block_size is None:  # one place for the context length: the model's
            cfg.data.block_size = window_length(None, cfg.model.init_args)
        if self.subcommand == "predict" and self.ckpt_vocab:
            cfg.data.vocab = self.ckpt_vocab  # the checkpoint's vocabulary: the corpus is never read

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.model.generation = init.generate  # the command line's, whatever a checkpoint holds
        if self.ckpt_vocab and self.datamodule.vocab != self.ckpt_vocab:
            cfg = self.config[self.subcommand]
            raise CharLMError(
                f"{cfg.ckpt_path} was trained on other text than {cfg.data.path or 'tiny Shakespeare'}: its "
                f"vocabulary ({len(self.ckpt_vocab)} characters) differs from the corpus's "
                f"({len(self.datamodule.vocab)}); pass the --data.path it was trained on"
            )


# Trainer options Lightning accepts but later divides by, clips with or loops on (written so nan fails).
TRAINER_CHECKS = {
    # Steps only: in one endless epoch Lightning refuses a fraction, and a duration crashes EarlyStopping.
    "val_check_interval": (lambda v: isinstance(v, int) and v >= 1, "a number of optimizer steps >= 1"),
    "max_steps": (lambda v: v >= 1, "a number of optimizer steps >= 1 (the learning rate decays until then)"),
    "log_every_n_steps": (lambda v: v >= 1, ">= 1"),
    "accumulate_grad_batches": (lambda v: v >= 1, ">= 1"),
    "gradient_clip_val": (lambda v: v >= 0, ">= 0"),
}

TRAINER_DEFAULTS = {
    "max_steps": 5000,
    "val_check_interval": 250,
    "check_val_every_n_epoch": None,  # one endless epoch: validate every val_check_interval steps
    "gradient_clip_val": 1.0,
    # The validation step is this project's own and under test: no trial batches before training (they
    # cost 3 s of start-up on a 2-core CPU).
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,  # RunSummary prints the run in one line
    "use_distributed_sampler": False,  # CharDataModule shards by rank itself, without padding
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "charlm", "default_hp_metric": False},
    },
}


def _resolve(class_path: str) -> type:
    """The class a dotted path names (lightning_charlm.GPTLM and lightning_charlm.module.GPTLM are one)."""
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def cli(args: list[str] | None = None, run: bool = True) -> CharLMCLI:
    """The `charlm` CLI with every house default; `run=False` only builds the objects (tests, benchmarks)."""
    return CharLMCLI(
        CharLM,
        CharDataModule,
        subclass_mode_model=True,
        parser_class=CharLMParser,
        parser_kwargs={"prog": "charlm", "description": "Train and sample character-level language models."},
        # Callbacks in trainer_defaults must be instances; they are added to those the config lists.
        trainer_defaults=TRAINER_DEFAULTS
        | {"precision": default_precision(), "callbacks": [TokensPerSecond(), RunSummary()]},
        auto_configure_optimizers=False,  # the module's own AdamW + warmup/cosine, stepped per step
        seed_everything_default=1337,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},  # a resumed run writes into its own folder again
        run=run,
        args=args,
    )


NOISE = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "💡 Tip:",
    "LOCAL_RANK:",
    "\nDetected KeyboardInterrupt",  # Ctrl-C before training: main() says "charlm: interrupted"
    "Seed set to",  # the run summary says it; predict prints its own sampling seed
    "Restoring states from the checkpoint",  # the run summary says "resuming at step N"
    "Restored all states from the checkpoint",
    "Loaded model weights from the checkpoint",
    "`Trainer.fit` stopped: `max_steps",  # the run's end line follows
    "Initializing distributed:",  # once per rank; the run summary says "on 2 x cpu"
    "-" * 100 + "\ndistributed_backend=",  # Lightning's banner when the ranks have met
)


def _quiet() -> None:
    """Drop the lines Lightning prints on every command that say nothing about this run (devices it does not
    use, an advertisement, its signal bookkeeping, a deprecation inside Lightning itself)."""
    loggers = ("pytorch.utilities.rank_zero", "fabric.utilities.rank_zero", "fabric.utilities.seed")
    for name in (*loggers, "fabric.utilities.distributed"):  # a rank's own lines start "[rank: N] "
        logging.getLogger(f"lightning.{name}").addFilter(
            lambda record: not re.sub(r"^\[rank: \d+\] ", "", str(record.msg)).startswith(NOISE)
        )
    # "[rank: 0] Received SIGTERM: 2" on Ctrl-C: the Checkpoint callback says what happens instead.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's all_gather (under DDP, of the RNG states saved in each checkpoint), once per rank and save
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    # A checkpoint of a run with --trainer.max_time holds its Timer's state: of no use to validate, test or
    # predict, nor to a resume without a time limit (one with a limit has its Timer back).
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`.*: \['Timer'\]\.$")
    if torch.cuda.is_available():  # TF32 for fp32 matrix products; Lightning asks for it on every run
        torch.set_float32_matmul_precision("high")


def main(args: list[str] | None = None) -> None:
    _quiet()
    SAVED_ON_SIGNAL.clear()
    WRITTEN_ON_SIGNAL.clear()
    try:
        cli(args)
    except Exception as err:
        message = user_error(err)
        if message is None:
            raise
        say(f"charlm: error: {message}", sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        predicting = "predict" in (sys.argv[1:] if args is None else args)
        step, path = SAVED_ON_SIGNAL[-1] if SAVED_ON_SIGNAL else (None, None)
        written = f": {WRITTEN_ON_SIGNAL[-1]}" if predicting and WRITTEN_ON_SIGNAL else ""
        say(
            f"charlm: stopped by a signal{f' at step {step}' if path else ''}{written}"
            f"{'' if predicting else '; continue with --ckpt_path last'}",
            sys.stderr,
        )
        if path:  # a line of its own: a path has no space to be broken at
            say(f"charlm: saved {path}", sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: a checkpoint being written is still finished on exit
        print("charlm: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
