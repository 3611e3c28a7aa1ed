"""README promises that had no test: training mechanics (schedule, weight decay, label smoothing, logged
metrics), sampling that leaves training alone, predict's options, generation equivalences, the download."""

import json
import math
import re
import shutil

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_charlm import corpus
from lightning_charlm.models import GPT, GPTConfig
from lightning_charlm.module import GPTLM, CharLM
from lightning_charlm.sampling import generate
from tests.conftest import charlm_main, tiny_shakespeare
from tests.test_cli import TINY, scalars

SHORT = [
    "--trainer.val_check_interval",
    "10",
    "--sample.every_n_steps",
    "1000",
    "--trainer.log_every_n_steps",
    "1",
]


def fit(tmp_path, corpus_path, *extra: str):
    res = charlm_main("fit", *TINY, "--data.path", str(corpus_path), *SHORT, *extra, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return tmp_path / "logs/charlm/version_0"


def test_schedule_decay_groups_and_logged_metrics(tmp_path, corpus):
    """warmup then cosine reaching min_lr at max_steps, logged once as `lr`; val/ppl and val/bpc are exactly
    exp(val/loss) and val/loss / ln 2."""
    run = fit(tmp_path, corpus, "--trainer.max_steps", "30", "--model.lr", "0.01", "--model.min_lr", "0.001")
    ea = scalars(run)
    lr = {e.step: e.value for e in ea.Scalars("lr")}

    def expected(step: int) -> float:  # linear warmup over 5 steps, then cosine from lr to min_lr at step 30
        if step < 5:
            return 0.01 * (step + 1) / 6
        return 0.001 + (0.01 - 0.001) * 0.5 * (1 + math.cos(math.pi * (step - 5) / 25))

    assert sorted(lr) == list(range(30))
    assert all(lr[s] == pytest.approx(expected(s), rel=1e-5) for s in lr)
    assert expected(30) == pytest.approx(0.001)  # min_lr exactly at max_steps
    assert not [t for t in ea.Tags()["scalars"] if t.startswith("lr-")]  # one lr curve
    for loss, ppl, bpc in zip(*(ea.Scalars(k) for k in ("val/loss", "val/ppl", "val/bpc")), strict=True):
        assert ppl.value == pytest.approx(math.exp(loss.value), rel=1e-5)
        assert bpc.value == pytest.approx(loss.value / math.log(2), rel=1e-5)


def test_weight_decay_only_on_matrices_and_label_smoothing_only_in_training(corpus):
    from lightning_charlm.data import CharDataModule

    dm = CharDataModule(path=str(corpus), block_size=16, batch_size=4)
    model = GPTLM(dm.vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, label_smoothing=0.3)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    decayed, plain = trainer.optimizers[0].param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    x, y = next(iter(dm.train_set))
    model.log = lambda *args, **kwargs: None  # outside a loop there is nowhere to log to
    with torch.no_grad():
        logits, targets = model.net(x).flatten(0, 1), y.flatten()
        model.val_loss.reset()
        model._shared_step((x, y), "val")
        plain = F.cross_entropy(logits, targets).item()
        assert model.val_loss.compute().item() == pytest.approx(plain, rel=1e-5)
        smoothed = F.cross_entropy(logits, targets, label_smoothing=0.3).item()
        assert model._shared_step((x, y), "train").item() == pytest.approx(smoothed, rel=1e-5) != plain


def test_samples_leave_training_untouched(tmp_path, corpus):
    """Samples at other steps (or none) give the same weights: sampling restores train mode and draws from
    its own generator, never from the one dropout uses."""
    weights = []
    for every in ("1000", "3", "7"):
        (tmp_path / every).mkdir()
        run = fit(tmp_path / every, corpus, "--trainer.max_steps", "20", "--model.dropout", "0.2",
                  "--sample.every_n_steps", every, "--generate.max_new_tokens", "5")  # fmt: skip
        weights.append(torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"])
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    from tests.conftest import make_corpus

    run = fit(tmp, make_corpus(tmp), "--trainer.max_steps", "60")
    return run / "checkpoints/best.ckpt"


def records(path, prompts_and_lengths) -> list[str]:
    """Split a predictions file by the known record lengths (texts may hold blank lines themselves)."""
    text, out, i = path.read_text(encoding="utf-8"), [], 0
    for n in prompts_and_lengths:
        out.append(text[i : i + n])
        assert text[i + n : i + n + 2] == "\n\n"
        i += n + 2
    assert i == len(text)
    return out


def test_a_continuation_depends_on_the_seed_its_prompt_and_sample_only(trained, tmp_path):
    """A record's text is repeated by its seed whatever the batch size, the prompts around it or the way
    it is asked for (predict, the Python API): its noise is seeded from (seed, prompt, sample number)."""
    import lightning_charlm

    settings = ["--generate.max_new_tokens", "25", "--generate.seed", "5", "--writer.format", "jsonl"]
    prompts = ["--data.prompts", '["the king", "my lord", "my lord"]']
    files = {}
    for batch in ("1", "2", "64"):
        out = tmp_path / f"b{batch}.jsonl"
        args = ["predict", "--ckpt_path", str(trained), *prompts, *settings, "--data.batch_size", batch]
        res = charlm_main(*args, "--writer.output", str(out), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        files[batch] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert files["1"] == files["2"] == files["64"]
    texts = [r["text"] for r in files["1"]]
    assert texts[1] != texts[2] and {r["seed"] for r in files["1"]} == {5}  # two samples of "my lord"
    lm = lightning_charlm.load(trained)
    kw = {"max_new_tokens": 25, "seed": 5, "temperature": 0.8}
    assert lm.generate("my lord", **kw) == texts[1]  # alone, at any position: the same text
    assert lm.generate(["my lord", "the king", "my lord"], **kw) == [texts[1], texts[0], texts[2]]
    # Seeds Python's hash() folds together (-1 and -2; 7 and 2**61 + 6, equal modulo 2**61 - 1) stay apart.
    seeds = (-1, -2, 7, 2**61 + 6, 2**64 - 1)
    assert len({lm.generate("my lord", **(kw | {"seed": s})) for s in seeds}) == len(seeds)


def test_predict_options_through_the_cli(trained, tmp_path):
    (tmp_path / "prompts.txt").write_text("the king\nmy lord\n", encoding="utf-8")
    base = [
        "predict",
        "--ckpt_path",
        str(trained),
        "--data.prompts_file",
        "prompts.txt",
        "--data.num_samples",
        "2",
    ]
    base += ["--generate.max_new_tokens", "25", "--generate.seed", "5"]
    a = charlm_main(*base, "--writer.output", "a.txt", cwd=tmp_path)
    b = charlm_main(*base, "--writer.output", "b.txt", cwd=tmp_path)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    sizes = [8 + 25, 8 + 25, 7 + 25, 7 + 25]  # each prompt twice, in order, 25 new characters each
    texts = records(tmp_path / "a.txt", sizes)
    assert texts == records(tmp_path / "b.txt", sizes)  # same seed, same text
    assert [t[:8] for t in texts[:2]] == ["the king"] * 2 and [t[:7] for t in texts[2:]] == ["my lord"] * 2
    assert texts[0] != texts[1]  # the two samples of one prompt differ
    stop = ["--generate.stop", "e", "--writer.format", "jsonl"]  # jsonl: a cut text may hold blank lines
    res = charlm_main(*base, *stop, "--writer.output", "s.jsonl", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()
    cuts = [record["prompt"] + record["text"] for record in map(json.loads, lines)]
    for full, cut in zip(texts, cuts, strict=True):
        prompt = full[:8] if full.startswith("the") else full[:7]
        continuation = full[len(prompt) :]
        end = continuation.index("e") + 1 if "e" in continuation else len(continuation)
        assert cut == prompt + continuation[:end]  # cut right after the first "e", if one was generated


def test_cached_equals_uncached_under_bf16_autocast_and_when_sampling(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    idx = torch.randint(11, (3, 5))
    # The compiled step under bf16 autocast is what a CUDA predict runs (aot_eager: the same trace on a CPU).
    aot = {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    monkeypatch.setattr("lightning_charlm.sampling.COMPILE", aot)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = generate(model, idx, 40, temperature=0, use_cache=True)
        plain = generate(model, idx, 40, temperature=0, use_cache=False)
        compiled = generate(model, idx, 40, temperature=0, compile=True)
    assert torch.equal(cached, plain) and torch.equal(compiled, plain)
    draws = [
        generate(model, idx, 40, temperature=1.0, use_cache=c, generator=torch.Generator().manual_seed(3))
        for c in (True, False)
    ]
    assert torch.equal(*draws)


@pytest.mark.skipif(tiny_shakespeare() is None, reason="tiny Shakespeare not available")
def test_download_is_verified_and_failures_are_one_clear_error(tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.txt"
    shutil.copy(tiny_shakespeare(), good)
    monkeypatch.delenv("CHARLM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache/lightning_charlm/tinyshakespeare.txt"
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not tiny Shakespeare\n" * 100)
    cases = {
        "http://127.0.0.1:9/input.txt": r"could not be downloaded",
        wrong.as_uri(): r"has sha256 [0-9a-f]{64}",
    }
    for url, message in cases.items():
        monkeypatch.setattr(corpus, "TINY_SHAKESPEARE_URL", url)
        res = charlm_main("fit", *TINY, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and re.search(message, res.stderr)
        assert not cached.exists() and not list(cached.parent.glob("*.part"))
    monkeypatch.setattr(corpus, "TINY_SHAKESPEARE_URL", good.as_uri())
    assert corpus.default_corpus() == cached and cached.read_bytes() == good.read_bytes()


def test_charlm_loads_whichever_model_a_checkpoint_holds(trained):
    model = CharLM.load_from_checkpoint(trained)
    assert type(model) is GPTLM
    saved = torch.load(trained, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_fit_validates_at_its_last_step(tmp_path, corpus):
    """25 steps with validation every 10: a last validation at step 25, so best.ckpt and the final
    val/loss are right; --sample.every_n_steps 0 turns samples off."""
    run = fit(tmp_path, corpus, "--trainer.max_steps", "25", "--sample.every_n_steps", "0")
    ea = scalars(run)
    assert [e.step + 1 for e in ea.Scalars("val/loss")] == [10, 20, 25]
    assert "samples/text_summary" not in ea.Tags()["tensors"]
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 25
