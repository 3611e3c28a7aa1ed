import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_charlm import GPTLM
from lightning_charlm.models import GPT, Bigram, GPTConfig
from lightning_charlm.sampling import (
    GenerationConfig,
    filter_logits,
    generate,
    pick,
    sample_text,
    stream_text,
)
from lightning_charlm.tokenizer import CharTokenizer


def tiny_gpt(block_size=16, dropout=0.0, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(vocab_size=11, block_size=block_size, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    )


def test_gpt_is_causal():
    model = tiny_gpt().eval()
    idx = torch.randint(11, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 11
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@pytest.mark.parametrize("model", [tiny_gpt(), Bigram(11)])
def test_interface_and_initial_loss_near_ln_v(model):
    if isinstance(model, Bigram):
        torch.nn.init.normal_(model.table.weight, std=0.02)
    idx = torch.randint(11, (4, 16))
    logits = model(idx)
    assert logits.shape == (4, 16, 11)
    targets = torch.randint(11, (4, 16))  # unrelated to the input: tied weights favour echoing it at init
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(11)) < 0.1


def test_gpt_overfits_a_tiny_corpus():
    torch.manual_seed(0)
    text = "to be or not to be, that is the question. "
    tok = CharTokenizer.from_text(text)
    data = tok.encode(text * 4).long()
    model = GPT(GPTConfig(len(tok), 32, n_layer=2, n_head=2, n_embd=64, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data[None, :32], data[None, 1:33]
    for _ in range(150):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_cached_greedy_equals_uncached_past_block_size():
    model = tiny_gpt(block_size=16).eval()
    idx = torch.randint(11, (3, 5))
    cached = generate(model, idx, 60, temperature=0, use_cache=True)  # 65 tokens: four times the block
    plain = generate(model, idx, 60, temperature=0, use_cache=False)
    assert cached.shape == (3, 65)
    assert torch.equal(cached, plain)


def test_prompt_longer_than_block_is_cropped():
    model = tiny_gpt(block_size=16).eval()
    idx = torch.randint(11, (1, 40))
    out = generate(model, idx, 5, temperature=0)
    assert torch.equal(out[:, :40], idx)
    assert torch.equal(out[:, 40:], generate(model, idx[:, -16:], 5, temperature=0)[:, 16:])


def test_top_k_one_is_greedy():
    model = tiny_gpt().eval()
    idx = torch.randint(11, (2, 4))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(
        generate(model, idx, 20, temperature=1.5, top_k=1, generator=g),
        generate(model, idx, 20, temperature=0),
    )


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    kept = lambda p: torch.isfinite(filter_logits(probs.log(), top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, False, True, False]
    assert kept(0.79) == [True, False, True, False]
    assert kept(0.81) == [True, False, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert torch.isfinite(filter_logits(probs.log(), top_k=2)).sum() == 2


def test_the_exponential_race_samples_the_filtered_softmax():
    """pick() samples argmax(probs / noise), noise ~ Exp(1) drawn ahead (so a decode step with its sampling
    is one CUDA graph): the law of torch.multinomial, with temperature and top-k applied; noise that is
    exactly 0 (clamped to the smallest float) cannot pick a filtered-out token."""
    torch.manual_seed(0)
    n, logits = 40_000, torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature, top_k in ((1.0, None), (0.5, None), (1.0, 2)):
        noise = torch.empty(n, 4).exponential_()
        token, checksum = pick(logits.expand(n, 4), noise, temperature, top_k, None)
        freq = torch.bincount(token.flatten(), minlength=4) / n
        law = filter_logits(logits / temperature, top_k).softmax(-1)[0]
        assert checksum.isfinite() and torch.allclose(freq, law, atol=0.01), (temperature, top_k, freq, law)
    tiny = torch.full((1, 4), torch.finfo(torch.float32).tiny)
    assert pick(logits, tiny, 1.0, 1, None)[0].item() == 0
    # A nan logit (a diverged model) still gives a token, and a sum that is not finite, for decode to report.
    token, checksum = pick(torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2), 1.0, None, None)
    assert 0 <= token.item() < 2 and not checksum.isfinite()


def test_same_seed_same_sample_and_stop_string():
    tok = CharTokenizer("\n abcdefghij")
    torch.manual_seed(0)
    model = GPT(GPTConfig(len(tok), 16, 1, 1, 16, 0.0)).eval()
    a = sample_text(model, tok, ["ab", "", "abc"], GenerationConfig(30, temperature=1.0, seed=7))
    b = sample_text(model, tok, ["ab", "", "abc"], GenerationConfig(30, temperature=1.0, seed=7))
    c = sample_text(model, tok, ["ab", "", "abc"], GenerationConfig(30, temperature=1.0, seed=8))
    assert a == b and a != c
    assert all(len(t) == 30 for t in a)


def cycle(text: str) -> tuple[Bigram, CharTokenizer]:
    """A bigram that always continues `text` as a cycle (each character -> the next one), whatever the
    sampling settings: its outputs are known exactly."""
    tok = CharTokenizer("".join(sorted(set(text))))
    model = Bigram(len(tok))
    with torch.no_grad():
        model.table.weight.fill_(-1e4)
        for a, b in zip(text, text[1:] + text[0], strict=True):
            model.table.weight[int(tok.encode(a)[0]), int(tok.encode(b)[0])] = 1e4
    return model.eval(), tok


def test_stop_string_cuts_after_its_first_appearance_in_the_continuation():
    model, tok = cycle("abcd")
    texts = sample_text(model, tok, ["a", "c"], GenerationConfig(20, temperature=1.0, seed=0, stop="da"))
    assert texts == ["bcda", "da"]  # cut right after the stop string, which is kept
    # A stop string that spans the prompt's end ("...a" + "b") does not count: only the continuation's.
    assert sample_text(model, tok, ["a"], GenerationConfig(20, temperature=0, stop="ab")) == ["bcdab"]


def test_activation_checkpointing_gives_the_same_gradients():
    grads, block_runs = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # through the LightningModule, as --model.checkpointing reaches the net
        lm = GPTLM("abcdefghijk", block_size=16, n_layer=2, n_head=2, n_embd=32, checkpointing=checkpointing)
        net, runs = lm.net, []
        for block in net.blocks:  # a pre-hook: the recomputation stops early, before forward hooks would run
            block.register_forward_pre_hook(lambda module, args, runs=runs: runs.append(1))
        torch.manual_seed(1)  # same dropout masks in both runs
        idx = torch.randint(11, (4, 16))
        F.cross_entropy(net(idx).flatten(0, 1), idx.roll(1).flatten()).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        block_runs.append(len(runs))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert block_runs == [2, 4]  # with checkpointing each block's forward runs again in the backward pass


def test_more_tokens_extend_every_text_of_a_seed():
    """Each prompt length draws from its own seed and the noise comes in blocks of 64 tokens: asking for
    more tokens extends each continuation, whatever other prompts are generated before it."""
    tok = CharTokenizer("\nabcdefgh")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(tok), block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = ["ab", "abc", "abc"]
    short = sample_text(model, tok, prompts, GenerationConfig(64, temperature=1.0, seed=5))
    long = sample_text(model, tok, prompts, GenerationConfig(70, temperature=1.0, seed=5))
    assert all(b.startswith(a) and len(b) == 70 for a, b in zip(short, long, strict=True))
    assert sample_text(model, tok, ["abc", "abc"], GenerationConfig(64, temperature=1.0, seed=5)) == short[1:]


def test_a_stream_joins_to_the_generated_text():
    torch.manual_seed(0)
    tok = CharTokenizer("\nabcdefgh")
    model = GPT(GPTConfig(vocab_size=len(tok), block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    for settings in (
        GenerationConfig(30, temperature=1.0, seed=3),
        GenerationConfig(30, temperature=1.0, seed=3, stop="a"),
    ):
        pieces = list(stream_text(model, tok, "abc", settings))
        assert all(len(p) == 1 for p in pieces)  # a character at a time
        assert "".join(pieces) == sample_text(model, tok, ["abc"], settings)[0]
    assert "".join(pieces).endswith("a") and len(pieces) < 30  # ended at the stop string


def test_the_static_cache_and_the_compiled_step_decode_as_the_uncached_net(monkeypatch):
    """Greedy tokens equal across a sliding window: no cache, the cache with the eager decode step, and the
    step compiled as one graph (fullgraph). On a CPU the compiled step uses the aot_eager backend: the same
    tracing, without minutes of C++ compiling; CUDA adds inductor's kernels and the graph replay."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).eval()
    idx = torch.randint(11, (2, 5))
    plain = generate(model, idx, 60, temperature=0, use_cache=False)  # 65 tokens: the window slides 4 times
    assert torch.equal(generate(model, idx, 60, temperature=0, use_cache=True), plain)
    aot = {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    monkeypatch.setattr("lightning_charlm.sampling.COMPILE", aot)
    from torch._dynamo.utils import counters

    counters.clear()
    assert torch.equal(generate(model, idx, 60, temperature=0, compile=True), plain)
    # One graph for every position and window (a recompile on CUDA re-records the CUDA graph: on an H100
    # a token's stride changing each round made the compiled path 2.6x slower than eager at batch 16).
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(generate(model, idx, 60, temperature=0, compile=True), plain)
    assert counters["stats"]["unique_graphs"] == 1
    # Sampled with a seed: the three paths draw the same noise, so they write the same text too.
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    seeded = partial(generate, model, idx, 60, temperature=1.0, top_k=5)
    sampled = seeded(generator=gen())
    assert torch.equal(seeded(generator=gen(), compile=True), sampled)
    assert torch.equal(seeded(generator=gen(), use_cache=False), sampled)


@pytest.mark.parametrize(
    "parts", [{}, {"positions": "rope", "qk_norm": True, "mlp": "swiglu", "norm": "rmsnorm"}]
)
def test_batch_one_on_a_cpu_splits_each_weight_across_the_cores_and_decodes_the_same(monkeypatch, parts):
    """At batch 1 on a CPU each weight's rows are cut into one slice per core (gpt.add_product): the step's
    logits equal the unsliced ones for any count of slices (3: some weights do not divide and stay whole),
    and greedy tokens equal the uncached net's through window slides, eager and compiled."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, **parts)
    model, idx = GPT(cfg).eval(), torch.randint(11, (1, 5))
    with torch.no_grad():
        cache = model.new_cache()
        model(idx, cache=cache)
        token, pos, kv = idx[:, -1:], torch.tensor([5]), cache.kv.clone()
        logits = {}
        for slices in (1, 2, 3, 4):
            cache.kv.copy_(kv)
            logits[slices] = model.decode_step(token, pos, cache, 6, slices)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # training samples under bf16-mixed
            cache = model.new_cache()
            model(idx, cache=cache)
            kv, mixed = cache.kv.clone(), []
            for slices in (1, 2):
                cache.kv.copy_(kv)
                mixed.append(model.decode_step(token, pos, cache, 6, slices).float())
    for slices in (2, 3, 4):
        torch.testing.assert_close(logits[slices], logits[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], mixed[0], rtol=0.02, atol=0.02)
    plain = generate(model, idx, 60, temperature=0, use_cache=False)
    threads = torch.get_num_threads()
    try:
        for cores in (1, 2, 4):  # decode() slices as many times as torch has threads
            torch.set_num_threads(cores)
            assert torch.equal(generate(model, idx, 60, temperature=0), plain)
        monkeypatch.setattr("lightning_charlm.sampling.COMPILE", {"backend": "aot_eager", "fullgraph": True})
        assert torch.equal(generate(model, idx, 60, temperature=0, compile=True), plain)
    finally:
        torch.set_num_threads(threads)
