"""Peak GPU memory of training for a config's model and batch (with its accumulation, precision and
activation checkpointing), e.g. whether configs/seed-large.yaml fits a 16 GB laptop GPU. Reports the peak
the tensors took (allocated) and the peak the caching allocator held from the GPU (reserved): the second is
what must fit.

    python benchmarks/memory.py configs/seed-large.yaml [--steps 16] [--model.checkpointing false ...]

Needs CUDA; on a CPU-only machine it says so and exits cleanly.
"""

import argparse
import gc
import sys
import tempfile

import torch
from _env import describe

from lightning_charlm.cli import cli


def peak_memory(config: str, steps: int, overrides: list[str]) -> tuple[str, float, float]:
    """(description, peak allocated GiB, peak reserved GiB) over `steps` optimizer steps of `config`."""
    gc.collect()
    torch.cuda.empty_cache()  # reserved memory left by earlier work in this process must not count
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        built = cli(
            run=False,
            args=[
                "-c",
                config,
                f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.precision=bf16-mixed",
                f"--trainer.default_root_dir={tmp}",
                "--trainer.logger=false",
                "--sample.every_n_steps=100000",
                *overrides,
            ],
        )
        built.trainer.fit(built.model, datamodule=built.datamodule)
    allocated, reserved = (
        f() / 2**30 for f in (torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved)
    )
    hp, dm = built.model.hparams, built.datamodule.hparams
    what = (
        f"{hp.n_layer}L {hp.n_head}H {hp.n_embd}w block {dm.block_size}, batch {dm.batch_size} x "
        f"{built.trainer.accumulate_grad_batches}, checkpointing {hp.get('checkpointing', False)}"
    )
    del built
    return what, allocated, reserved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps to run")
    args, overrides = ap.parse_known_args()
    print(describe())
    if not torch.cuda.is_available():
        print("no CUDA device: peak GPU memory not measured")
        return
    what, allocated, reserved = peak_memory(args.config, args.steps, overrides)
    print(f"{args.config}: {what}: peak allocated {allocated:.2f} GiB, reserved {reserved:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
