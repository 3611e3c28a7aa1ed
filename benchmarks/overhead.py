"""Lightning overhead: steady-state training tokens/s of the project's Trainer (GPTLM + CharDataModule, the
default callbacks and a TensorBoard logger) against the best plain PyTorch loop for the same work: same GPT,
batch and random windows cut from the training split on the device, fused AdamW on CUDA, clipping,
precision, and the same compile setting. Validation is off in both. The two sides alternate, `--repeats`
times each, and the table gives the median and the spread.

    python benchmarks/overhead.py                 # CPU: configs/gpt-cpu.yaml's model and batch
    python benchmarks/overhead.py --size gpt      # configs/gpt.yaml's (on CUDA when present)
    python benchmarks/overhead.py --compile       # both sides compiled (the default on CUDA)
    python benchmarks/overhead.py --find-syncs    # CUDA: where the Trainer's steps wait for the GPU
"""

import argparse
import collections
import statistics
import tempfile
import time
import traceback
import warnings

import lightning as L
import torch
from _env import describe
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_charlm.callbacks import TokensPerSecond
from lightning_charlm.data import CharDataModule, RandomWindows
from lightning_charlm.module import GPTLM

SIZES = {  # (block_size, n_layer, n_head, n_embd, batch_size)
    "tiny": (32, 2, 2, 32, 16),
    "gpt-cpu": (128, 4, 4, 128, 32),
    "gpt": (256, 6, 6, 384, 128),
}


def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.warmup:
            self.start = sync(pl_module.device.type)

    def on_train_end(self, trainer, pl_module):
        self.seconds = sync(pl_module.device.type) - self.start


class SyncFinder(L.Callback):
    """From step `start` on, counts every synchronizing CUDA call (torch.cuda.set_sync_debug_mode) by the
    Python lines that made it: each one drains the GPU's queue, and the step after it waits for the host."""

    def __init__(self, start: int):
        self.start, self.sites = start, collections.Counter()

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.start:
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)

    def _record(self, message, *args, **kwargs):
        if "synchronizing" in str(message):
            stack = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
            self.sites[
                " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in stack[-4:][::-1])
            ] += 1


def trainer_rate(dm, model_kwargs, steps, warmup, device, precision, finder=None) -> float:
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            precision=precision,
            max_steps=warmup + steps,
            limit_val_batches=0,
            gradient_clip_val=1.0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=TensorBoardLogger(tmp),
            callbacks=[TokensPerSecond(), timer, *([finder] if finder else [])],
        )
        trainer.fit(GPTLM(dm.vocab, **model_kwargs), datamodule=dm)
    return steps * dm.hparams.batch_size * dm.hparams.block_size / timer.seconds


def plain_rate(dm, model_kwargs, steps, warmup, device, precision) -> float:
    torch.manual_seed(0)
    lm = GPTLM(dm.vocab, **model_kwargs).to(device)  # only for its net
    net = lm.net
    if model_kwargs["compile"]:
        net.compile_blocks()
    params = list(net.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=model_kwargs["fused"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 101))
    train, _ = dm.splits
    batches = iter(RandomWindows(train.to(device), dm.hparams.block_size, dm.hparams.batch_size, seed=0))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for i in range(warmup + steps):
        if i == warmup:
            start = sync(device)
        x, y = next(batches)
        with autocast:
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps * dm.hparams.batch_size * dm.hparams.block_size / (sync(device) - start)


def compare(size, steps, warmup, repeats, compile, path=None, on_device=None) -> dict:
    """Median tokens/s of both sides (alternating) and the Trainer/plain ratio, with each side's range.
    on_device=False leaves the Trainer's training split on the host (the plain loop's stays on the device)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    block, n_layer, n_head, n_embd, batch = SIZES[size]
    model_kwargs = dict(
        block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0, compile=compile
    )
    model_kwargs["fused"] = device == "cuda"
    dm = CharDataModule(path=path, block_size=block, batch_size=batch, on_device=on_device)
    runs = {"plain": [], "trainer": []}
    for _ in range(repeats):
        runs["plain"].append(plain_rate(dm, model_kwargs, steps, warmup, device, precision))
        runs["trainer"].append(trainer_rate(dm, model_kwargs, steps, warmup, device, precision))
    med = {k: statistics.median(v) for k, v in runs.items()}
    tokens = batch * block
    return {
        "what": f"{size} ({n_layer}L {n_embd}w block {block}) batch {batch}, {precision}",
        "compile": compile,
        "plain_tok_s": med["plain"],
        "trainer_tok_s": med["trainer"],
        "plain_ms_step": 1000 * tokens / med["plain"],
        "trainer_ms_step": 1000 * tokens / med["trainer"],
        "ratio": med["trainer"] / med["plain"],
        "spread": {k: (min(v), max(v)) for k, v in runs.items()},
    }


def find_syncs(size: str, steps: int, warmup: int, compile: bool) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--find-syncs needs a CUDA GPU")
    block, n_layer, n_head, n_embd, batch = SIZES[size]
    kwargs = dict(block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0)
    kwargs |= dict(compile=compile, fused=True)
    finder = SyncFinder(warmup)
    dm = CharDataModule(block_size=block, batch_size=batch)
    trainer_rate(dm, kwargs, steps, warmup, "cuda", "bf16-mixed", finder)
    print(f"{describe()}\nsynchronizing calls in {steps} steps after {warmup} ({size}, compile {compile}):")
    for site, n in finder.sites.most_common(15):
        print(f"{n:6d}  {site}")
    if not finder.sites:
        print("  none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 100 on CPU, 300 on CUDA)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="trials per side, alternating")
    ap.add_argument("--compile", action="store_true", help="compile the blocks on both sides")
    ap.add_argument("--find-syncs", action="store_true", help="CUDA: list the Trainer's host syncs per step")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    size = args.size or ("gpt" if cuda else "gpt-cpu")
    steps = args.steps or (300 if cuda else 100)
    if args.find_syncs:
        return find_syncs(size, steps, args.warmup, args.compile)
    r = compare(size, steps, args.warmup, args.repeats, args.compile)
    print(describe())
    print(
        f"model {r['what']}, compile {r['compile']}, {steps} timed steps after {args.warmup}, x{args.repeats}"
    )
    print(f"{'loop':>16} {'tokens/s (median)':>18} {'ms/step':>8} {'range':>22}")
    for side in ("plain", "trainer"):
        lo, hi = r["spread"][side]
        name = "plain PyTorch" if side == "plain" else "charlm Trainer"
        print(
            f"{name:>16} {r[side + '_tok_s']:>18.0f} {r[side + '_ms_step']:>8.2f} {lo:>10.0f} - {hi:<10.0f}"
        )
    print(f"Trainer / plain = {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
