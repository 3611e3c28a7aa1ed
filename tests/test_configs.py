"""Every YAML in configs/ parses and instantiates model, data and trainer."""

from pathlib import Path

import pytest

from lightning_charlm.cli import CharLMCLI
from lightning_charlm.data import CharDataModule
from lightning_charlm.module import CharLM
from tests.conftest import needs_shakespeare

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"bigram.yaml", "gpt.yaml", "gpt-cpu.yaml", "seed.yaml"}


@needs_shakespeare
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = CharLMCLI(
        CharLM,
        CharDataModule,
        subclass_mode_model=True,
        run=False,
        auto_configure_optimizers=False,
        args=["-c", str(config), "--trainer.accelerator", "cpu"],
    )
    assert isinstance(cli.model, CharLM)
    assert cli.model.hparams.vocab == cli.datamodule.vocab and len(cli.datamodule.vocab) == 65
    assert cli.trainer.max_steps > 0
    assert cli.trainer.logger.save_dir == "logs"
    if "block_size" in cli.model.hparams:
        assert cli.model.hparams.block_size >= cli.datamodule.hparams.block_size
