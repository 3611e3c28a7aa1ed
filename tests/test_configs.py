"""Every YAML in configs/ builds model, data and trainer with `charlm`'s own defaults, and says what the
README's configs table says of it."""

import inspect
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping

from lightning_charlm import GPTLM, BigramLM, CharLM
from lightning_charlm.callbacks import SampleText, TokensPerSecond
from lightning_charlm.checkpointing import Checkpoint
from lightning_charlm.cli import cli
from tests.conftest import needs_shakespeare

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
# The README's table: model class, (n_layer, n_head, n_embd, block_size) and the training settings it names.
README = {
    "bigram.yaml": (BigramLM, None, dict(lr=0.1, max_steps=1500)),
    "gpt-cpu.yaml": (
        GPTLM,
        (3, 4, 128, 128),
        dict(batch_size=16, max_steps=2000, positions="rope", optimizer="muon"),
    ),
    "gpt.yaml": (GPTLM, (6, 6, 384, 256), dict(batch_size=128, lr=1.5e-3, dropout=0.2, val_every=125)),
    "seed.yaml": (GPTLM, (4, 4, 256, 256), dict(batch_size=256, lr=6e-4, dropout=0.1, label_smoothing=0.1)),
    "seed-large.yaml": (GPTLM, (6, 8, 512, 512), dict(batch_size=32, accumulate=8, checkpointing=True)),
    "enwik8.yaml": (GPTLM, (8, 8, 512, 512), dict(unit="byte", split=[0.9, 0.05, 0.05], batch_size=32)),
}


def test_every_config_is_in_the_readme():
    assert {p.name for p in CONFIGS} == set(README)


@needs_shakespeare
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_builds_with_the_house_defaults(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = []
    if config.name == "enwik8.yaml":  # tests never download: a small file stands in for enwik8
        (tmp_path / "bytes.bin").write_bytes(bytes(range(256)) * 2000)
        extra = ["--data.path", str(tmp_path / "bytes.bin")]
    built = cli(["-c", str(config), "--trainer.accelerator", "cpu", *extra], run=False)
    model, data, trainer = built.model, built.datamodule, built.trainer
    cls, shape, settings = README[config.name]
    assert type(model) is cls and isinstance(model, CharLM)
    assert model.hparams.vocab == data.vocab and len(data.vocab) == (256 if extra else 65)
    if shape:
        hp = model.hparams
        assert (hp.n_layer, hp.n_head, hp.n_embd, hp.block_size) == shape
        assert data.hparams.block_size == hp.block_size
    values = {**model.hparams, **data.hparams, "max_steps": trainer.max_steps}
    values |= {"val_every": trainer.val_check_interval, "accumulate": trainer.accumulate_grad_batches}
    assert {k: values[k] for k in settings} == settings
    # main()'s defaults, which the README describes once for all configs
    assert trainer.gradient_clip_val == 1.0 and trainer.precision == "32-true"
    assert trainer.logger.save_dir == "logs" and trainer.logger.name == config.stem
    kinds = {type(c) for c in trainer.callbacks}
    assert {Checkpoint, EarlyStopping, SampleText, TokensPerSecond} <= kinds


@needs_shakespeare
def test_a_named_model_has_its_own_defaults_not_the_default_models(tmp_path, monkeypatch):
    """jsonargparse hands the init_args of a default class to a class named later where it accepts them: the
    bigram trained with the GPT's lr, warmup and weight decay while its help showed its own defaults."""
    monkeypatch.chdir(tmp_path)
    keys, defaults = ("lr", "min_lr", "warmup_steps", "weight_decay"), inspect.signature(BigramLM).parameters
    bigram_yaml = [p for p in CONFIGS if p.name == "bigram.yaml"]
    for args, given in (
        (["-c", str(*bigram_yaml)], dict(lr=0.1, min_lr=0.01)),  # what the config sets, the rest the class's
        (["--model", "lightning_charlm.BigramLM"], {}),
    ):
        hp = cli([*args, "--trainer.accelerator", "cpu"], run=False).model.hparams
        assert {k: hp[k] for k in keys} == {k: given.get(k, defaults[k].default) for k in keys}
    assert type(cli(["--model.n_layer", "2"], run=False).model) is GPTLM  # none named: the GPT
