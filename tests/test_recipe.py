"""The modern recipe's options (models/parts.py, optim.py): each builds a working GPT, rotary decoding slides
its cache, Muon and rotary runs resume exactly, and checkpoints from before the options still serve."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_charlm import load
from lightning_charlm.models import GPT, GPTConfig
from lightning_charlm.optim import MuonAdamW, orthogonalize
from lightning_charlm.sampling import generate
from tests.conftest import charlm_main
from tests.test_resume import RUN, assert_same_params, callbacks, last

MODERN = dict(positions="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_head=False, zero_init=True)
OPTIONS = {
    "rope": dict(positions="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu"),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_head=False),
    "zero_init": dict(zero_init=True),
    "modern": MODERN,
}
MODERN_ARGS = [f"--model.{k}={str(v).lower()}" for k, v in MODERN.items()]


def gpt(block_size=16, seed=0, **options) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=11, block_size=block_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0, **options
    )
    return GPT(cfg)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_option_builds_a_causal_gpt_that_starts_near_ln_v(options):
    model = gpt(**options).eval()
    idx = torch.randint(11, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 11
    a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 11)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)  # causal
    zero = options.get("zero_init") and not options.get("tie_head", True)
    if zero:  # the head starts at zero: every logit 0, the loss exactly ln V
        assert torch.equal(a, torch.zeros_like(a))
    else:
        assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-4)
    loss = F.cross_entropy(a.flatten(0, 1), torch.randint(11, (32,)))
    assert abs(loss.item() - math.log(11)) < 0.1
    names = dict(model.named_parameters())
    assert ("wpe.weight" in names) == (options.get("positions", "learned") == "learned")
    assert ("head.weight" in names) == (not options.get("tie_head", True))  # tied: one matrix, wte's
    if options.get("zero_init"):
        assert all(not p.any() for n, p in names.items() if n.endswith("proj.weight"))


def test_swiglu_and_relu2_keep_the_mlp_size():
    sizes = {mlp: sum(p.numel() for p in gpt(mlp=mlp).parameters()) for mlp in ("gelu", "relu2", "swiglu")}
    assert sizes["relu2"] == sizes["gelu"] and abs(sizes["swiglu"] / sizes["gelu"] - 1) < 0.05


def test_rotary_decoding_slides_the_cache_one_token_at_a_time(monkeypatch):
    """Past block_size the window moves one token per step in both paths (no refill with the cache); the
    ring's positions are shifted back every block (GPT.shift_cache). Greedy tokens are equal: no cache, the
    eager decode step, and the step compiled as one graph (aot_eager on a CPU, as in test_models)."""
    model = gpt(**MODERN)
    for p in model.parameters():  # leave the zero start: a model whose output depends on its input
        p.data += 0.05 * torch.randn_like(p)
    model.eval()
    idx = torch.randint(11, (2, 5))
    plain = generate(model, idx, 75, temperature=0, use_cache=False)  # 80 tokens: five blocks, two shifts
    prefills = []
    monkeypatch.setattr(model, "forward", lambda *a, f=model.forward, **k: prefills.append(1) or f(*a, **k))
    assert torch.equal(generate(model, idx, 75, temperature=0), plain)
    assert len(prefills) == 1  # the cache was filled once, then only slid
    aot = {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    monkeypatch.setattr("lightning_charlm.sampling.COMPILE", aot)
    from torch._dynamo.utils import counters

    counters.clear()
    assert torch.equal(generate(model, idx, 75, temperature=0, compile=True), plain)
    assert counters["stats"]["unique_graphs"] == 1  # the ring's shifts and slides: one graph throughout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32-cpu", "bf16-as-on-cuda"])
def test_newton_schulz_orthogonalises_in_either_dtype(dtype):
    """Both of orthogonalize's paths (bf16 is CUDA's default), against torch.optim.Muon's own iteration."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g, dtype)
    assert o.dtype == g.dtype and o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert 0.5 < s.min() and s.max() < 1.5  # every direction of g kept, at about unit scale
    reference = _zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
    assert (o - reference).abs().max() < (0.05 if dtype == torch.bfloat16 else 0.01)


def test_muon_and_adamw_state_round_trips_as_one_optimizer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))

    def optimizer(net):
        p = dict(net.named_parameters())
        rest = [p["0.weight"], p["1.bias"], p["2.weight"], p["2.bias"]]
        return MuonAdamW([{"params": [p["1.weight"]]}], [{"params": rest}], lr=1e-2)

    def train(net, opt, steps, seed):
        data = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            loss = net(torch.randint(10, (4, 5), generator=data)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    a = copy.deepcopy(net)
    opt_a = optimizer(a)
    train(a, opt_a, 5, 1)
    b = copy.deepcopy(a)
    opt_b = optimizer(b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a file: no tensor shared
    train(a, opt_a, 5, 2)
    train(b, opt_b, 5, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    state = opt_b.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer"} and {"exp_avg", "exp_avg_sq"} <= set(state[1])
    torch.optim.lr_scheduler.LambdaLR(opt_b, lambda step: 0.5)  # one schedule scales both inner optimizers
    assert [g["lr"] for g in opt_b.param_groups + opt_b.adamw.param_groups] == [5e-3] * 3  # muon, adamw


def test_muon_and_rotary_resume_bitwise_exactly(tmp_path, corpus):
    run = [*RUN, *MODERN_ARGS, "--model.optimizer", "muon", "--data.path", str(corpus)]
    reference = tmp_path / "reference"
    reference.mkdir()
    assert charlm_main("fit", *run, cwd=reference).returncode == 0
    first = charlm_main("fit", *run, *callbacks("StopAtStep", step=20), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = charlm_main("fit", *run, "--ckpt_path", "last", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    ckpt = last(tmp_path)
    assert_same_params(ckpt, last(reference))
    kinds = {frozenset(s) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert frozenset({"momentum_buffer"}) in kinds and any("exp_avg" in k for k in kinds)  # Muon and AdamW


def test_a_checkpoint_from_before_the_options_loads_validates_and_predicts(tmp_path, corpus):
    """A checkpoint without the new hyperparameters (as written at ad15e8d: learned positions, LayerNorm,
    gelu, a tied head, AdamW) is built as it was, even where the command's config asks for the new recipe."""
    fit = charlm_main("fit", *RUN, "--trainer.max_steps", "15", "--data.path", str(corpus), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    path = tmp_path / "logs/charlm/version_0/checkpoints/best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    for key in (*MODERN, "optimizer"):
        del ckpt["hyper_parameters"][key]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    validated = []
    for ckpt_path in (path, old):
        val = charlm_main("validate", "--ckpt_path", str(ckpt_path), *MODERN_ARGS, cwd=tmp_path)
        assert val.returncode == 0, val.stderr
        validated.append([line for line in val.stdout.splitlines() if "val/loss" in line])
    assert validated[0] and validated[0] == validated[1]  # the same model, the same loss
    pred = charlm_main("predict", "--ckpt_path", str(old), "--generate.max_new_tokens", "20",
                       "--generate.seed", "1", "--data.prompts", '["The"]', cwd=tmp_path)  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    model = load(old)
    assert model.net.wpe is not None and model.hparams.positions == "learned"
    assert model.generate("The", max_new_tokens=20, seed=1) in pred.stdout
