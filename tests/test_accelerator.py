"""What a CUDA run takes, forced on the CPU: fused AdamW, bf16-mixed and 16-mixed, clipping, compile, and the
training split on the run's device. A crash on one of these branches must fail here, not on a user's GPU."""

import json
import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_charlm import GPTLM, CharDataModule
from lightning_charlm.models import GPT, GPTConfig
from tests.conftest import CHARLM, run_charlm
from tests.test_cli import TINY, scalars
from tests.test_resume import ENV, callbacks


def gpu_image_packages(folder: Path) -> dict:
    """Stand-ins for transformers and torchvision, installed as a GPU image has them, that fail when imported
    (as a torchvision built for another torch does): the env that puts them on the import path."""
    for name, version in (("transformers", "4.46.0"), ("torchvision", "0.21.0")):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise RuntimeError('{name} was imported')\n")
        (folder / f"{name}-{version}.dist-info").mkdir()
        (folder / f"{name}-{version}.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
    return {"PYTHONPATH": os.pathsep.join([str(folder), ENV["PYTHONPATH"]])}


def test_cuda_settings_train_through_charlm(tmp_path, corpus):
    """fused AdamW + bf16-mixed + clipping + compile, the combination `charlm fit` takes on a CUDA GPU; with
    transformers and torchvision installed, which torchmetrics imports with Lightning (seconds, or a crash)
    and charlm leaves out."""
    env = gpu_image_packages(tmp_path / "site")
    kept = subprocess.run(  # they are seen: with CHARLM_IMPORT_ALL=1 they are imported (and fail)
        [CHARLM, "fit", "--no_such_option"],
        env=os.environ | env | {"CHARLM_IMPORT_ALL": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert kept.returncode == 1 and "was imported" in kept.stderr
    graphs = tmp_path / "graphs.json"
    res = run_charlm(
        "fit",
        *TINY,
        "--data.path",
        str(corpus),
        "--trainer.precision",
        "bf16-mixed",
        "--model.fused",
        "true",
        "--model.compile",
        "true",
        "--trainer.gradient_clip_val",
        "0.5",
        "--trainer.max_steps",
        "40",
        "--trainer.log_every_n_steps",
        "5",
        "--trainer.val_check_interval",
        "10",
        "--sample.every_n_steps",
        "15",
        "--generate.max_new_tokens",
        "20",
        *callbacks("CountGraphs", path=str(graphs)),
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    ea = scalars(tmp_path / "logs/charlm/version_0")
    norms = [e.value for e in ea.Scalars("train/grad_norm")]
    assert norms and all(n > 0 for n in norms)
    val = [e.value for e in ea.Scalars("val/loss")]
    assert len(val) == 4 and val[-1] < val[0]
    # Compiled graphs after each of the 4 rounds: the first round's count holds (training, later rounds and
    # sampling add none).
    counts = json.loads(graphs.read_text())
    assert len(counts) == 4 and counts[0] > 0
    assert counts == [counts[0]] * 4, counts


def total_norm(model: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


class NormAtStep(L.Callback):
    """Records the gradient norm the optimizer stepped with (after unscaling and clipping). Lightning runs
    the backward pass inside optimizer.step, so it is read after the step, before the next zero_grad."""

    def __init__(self):
        self.norms: list[float] = []

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        if trainer.global_step > 0:  # zero_grad also runs once before the first backward
            self.norms.append(total_norm(pl_module))


# The modern recipe with Muon (configs/gpt-cpu.yaml's options), as a GPU run of it would train.
RECIPE = dict(positions="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, zero_init=True, optimizer="muon")


@pytest.mark.parametrize("recipe", [False, True], ids=["gpt2", "recipe-muon"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_clipping_with_every_optimizer_and_precision(precision, fused, recipe, corpus, tmp_path):
    dm = CharDataModule(path=str(corpus), block_size=16, batch_size=8)
    model = GPTLM(
        dm.vocab,
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        dropout=0.0,
        lr=1.0,
        warmup_steps=0,
        fused=fused,
        **(RECIPE if recipe else {}),
    )
    recorder = NormAtStep()
    # Lightning turns "16-mixed" into bf16 on a CPU; the plugin, as a CUDA run builds it, keeps fp16 and
    # its gradient scaler, so the unscale-then-clip branch runs here too.
    scaled = (
        MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
        if precision == "16-mixed"
        else None
    )
    trainer = L.Trainer(
        accelerator="cpu",
        precision=None if scaled else precision,
        plugins=[scaled] if scaled else None,
        max_steps=4,
        log_every_n_steps=1,
        gradient_clip_val=0.05,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    adamw = trainer.optimizers[0].adamw if recipe else trainer.optimizers[0]  # MuonAdamW holds one
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is fused
    assert (getattr(trainer.precision_plugin, "scaler", None) is not None) == (precision == "16-mixed")
    # Huge steps (lr 1.0) give large gradients; every step the optimizer took saw them clipped to 0.05.
    assert len(recorder.norms) >= 2
    assert all(abs(n - 0.05) < 1e-4 for n in recorder.norms), recorder.norms
    assert trainer.callback_metrics["train/grad_norm"] > 0.05  # logged before clipping


def test_compiled_and_eager_training_agree():
    def losses(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        net = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
        if compiled:
            net.compile_blocks()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(1)
        out = []
        for _ in range(5):
            idx = torch.randint(11, (4, 17), generator=data)
            loss = F.cross_entropy(net(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        assert list(net.state_dict()) == list(GPT(net.cfg).state_dict())  # compiled in place: same keys
        return out

    eager, compiled = losses(False), losses(True)
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, abs=1e-4)


def _fsdp_clip(rank: int, rendezvous: str, results) -> None:
    """One rank of a 2-process gloo group: clip an FSDP-sharded GPT with the module's clipping function."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_charlm.module import clip_grad_norm

    # a file, not a free port: a port found free can be taken by another process before the group binds it
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    reference = GPT(net.cfg)
    reference.load_state_dict(net.state_dict())
    sharded = FullyShardedDataParallel(net, device_id=torch.device("cpu"), use_orig_params=True)
    idx = torch.randint(11, (2, 4, 17), generator=torch.Generator().manual_seed(1))  # one batch per rank
    F.cross_entropy(sharded(idx[rank, :, :-1]).flatten(0, 1), idx[rank, :, 1:].flatten()).backward()
    for r in range(2):  # unsharded: the mean over both ranks' batches, as FSDP averages gradients
        (F.cross_entropy(reference(idx[r, :, :-1]).flatten(0, 1), idx[r, :, 1:].flatten()) / 2).backward()
    before = clip_grad_norm(sharded, 0.01)
    local = [p.grad.flatten() for p in sharded.parameters() if p.grad is not None]
    after = torch.cat(local).square().sum()
    dist.all_reduce(after)  # the squared norm of all shards together
    full = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    results[rank] = (before.item(), full.item(), after.sqrt().item())
    dist.destroy_process_group()


def test_clipping_under_fsdp_uses_the_global_norm(tmp_path):
    """Lightning refuses FSDP on a CPU, so the clipping function is run below it, on 2 gloo processes."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_fsdp_clip, args=(str(tmp_path / "rendezvous"), results), nprocs=2)
    for rank in (0, 1):
        before, full, after = results[rank]
        assert before == pytest.approx(full, rel=1e-4)  # every rank saw the norm of the whole gradient
        assert after == pytest.approx(0.01, rel=1e-3)


def test_no_training_metric_makes_lightning_wait_for_the_device_each_step(corpus):
    """Lightning turns every prog_bar metric of the training loop into a number (.item(): on a GPU a sync
    that drains the queue) at the end of every step. On an H100 that cost a tenth of each step (Trainer
    0.87x a plain loop), through train/tokens_per_s. So none is logged that way: the bar reads the rate
    from the callback, and train/loss from the module, at most twice a second."""
    from lightning_charlm.callbacks import StepProgressBar, TokensPerSecond

    dm = CharDataModule(path=str(corpus), block_size=16, batch_size=4)
    model = GPTLM(dm.vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    bar, rate = StepProgressBar(), TokensPerSecond(every_n_steps=50)  # on a CPU the bar's rate is renewed
    # every 5 steps, before TensorBoard's first window of 50 ends
    trainer = L.Trainer(
        max_steps=10, log_every_n_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        callbacks=[bar, rate],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    results = trainer.fit_loop.epoch_loop._results
    assert not [k for k, m in results.items() if m.meta.prog_bar], "a prog_bar metric in the training loop"
    bar._metrics = None  # the bar re-reads at most twice a second: read now
    shown = bar.get_metrics(trainer, model)
    assert rate.rate and shown["tok/s"] and "loss" in shown
