"""Lightning overhead: steady-state training tokens/s of the project's Trainer (GPTLM + CharDataModule, the
default callbacks and a TensorBoard logger) against a plain PyTorch loop doing the same work: same GPT,
batch, random windows, AdamW groups, a per-step LambdaLR (warmup only: the same cost per step, not the same
curve), clipping and precision. Validation is off in both.

    python benchmarks/overhead.py                 # CPU: configs/gpt-cpu.yaml's model and batch
    python benchmarks/overhead.py --size gpt      # configs/gpt.yaml's (on CUDA when present)
"""

import argparse
import tempfile
import time

import lightning as L
import torch
from _env import describe
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_charlm.callbacks import TokensPerSecond
from lightning_charlm.data import CharDataModule, RandomWindows
from lightning_charlm.module import GPTLM

SIZES = {  # (block_size, n_layer, n_head, n_embd, batch_size)
    "gpt-cpu": (128, 4, 4, 128, 32),
    "gpt": (256, 6, 6, 384, 64),
}


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def trainer_rate(dm, model_kwargs, steps, warmup, device, precision) -> float:
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
            callbacks=[LearningRateMonitor("step"), TokensPerSecond(), timer],
        )
        trainer.fit(GPTLM(dm.vocab, **model_kwargs), datamodule=dm)
    return steps * dm.hparams.batch_size * dm.hparams.block_size / timer.seconds


def plain_rate(dm, model_kwargs, steps, warmup, device, precision) -> float:
    torch.manual_seed(0)
    lm = GPTLM(dm.vocab, **model_kwargs).to(device)  # only for its net and optimizer recipe
    net = lm.net
    params = list(net.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 101))
    train, _ = dm.splits
    batches = iter(RandomWindows(train, dm.hparams.block_size, dm.hparams.batch_size, seed=0))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast:
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * dm.hparams.batch_size * dm.hparams.block_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 100 on CPU, 500 on CUDA)")
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or ("gpt" if device == "cuda" else "gpt-cpu")
    steps = args.steps or (500 if device == "cuda" else 100)
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    block, n_layer, n_head, n_embd, batch = SIZES[size]
    model_kwargs = dict(block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0)
    dm = CharDataModule(block_size=block, batch_size=batch)
    plain = plain_rate(dm, model_kwargs, steps, args.warmup, device, precision)
    lit = trainer_rate(dm, model_kwargs, steps, args.warmup, device, precision)
    print(describe())
    print(
        f"model {size} ({n_layer} layers, {n_embd} wide, block {block}), batch {batch}, {precision}, "
        f"{steps} timed steps after {args.warmup}"
    )
    print(f"{'loop':>16} {'tokens/s':>10}")
    print(f"{'plain PyTorch':>16} {plain:>10.0f}")
    print(f"{'charlm Trainer':>16} {lit:>10.0f}")
    print(f"Trainer / plain = {lit / plain:.3f}")


if __name__ == "__main__":
    main()
