"""Peak GPU memory of a training step for a config's model and batch (with its accumulation, precision and
activation checkpointing), e.g. whether configs/seed-large.yaml fits a 16 GB laptop GPU.

    python benchmarks/memory.py configs/seed-large.yaml [--steps 16]

Needs CUDA; on a CPU-only machine it says so and exits cleanly.
"""

import argparse
import sys
import tempfile

import torch
from _env import describe

from lightning_charlm.cli import CharLMCLI, CharLMParser
from lightning_charlm.data import CharDataModule
from lightning_charlm.module import CharLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps to run")
    args, overrides = ap.parse_known_args()
    print(describe())
    if not torch.cuda.is_available():
        print("no CUDA device: peak GPU memory not measured")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cli = CharLMCLI(
            CharLM,
            CharDataModule,
            subclass_mode_model=True,
            run=False,
            parser_class=CharLMParser,
            auto_configure_optimizers=False,
            args=[
                "-c",
                args.config,
                f"--trainer.max_steps={args.steps}",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.precision=bf16-mixed",
                f"--trainer.default_root_dir={tmp}",
                "--trainer.logger=false",
                *overrides,
            ],
        )
        torch.cuda.reset_peak_memory_stats()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    peak = torch.cuda.max_memory_allocated() / 2**30
    hp, dm = cli.model.hparams, cli.datamodule.hparams
    accumulate = cli.trainer.accumulate_grad_batches
    batch = f"batch {dm.batch_size} x {accumulate} accumulated"
    shape = f"{hp.n_layer} layers, {hp.n_embd} wide, block {dm.block_size}"
    ckpt = f"checkpointing {hp.get('checkpointing', False)}"
    print(f"{args.config}: {shape}, {batch}, {ckpt}: peak {peak:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
