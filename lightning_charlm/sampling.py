"""The one generation loop, for every model: temperature, top-k, top-p, seeds, stop strings, a KV cache;
and GenerationConfig, the settings that `charlm predict`, SampleText and the Python API share."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lightning_charlm.data import sample_numbers
from lightning_charlm.errors import CharLMError
from lightning_charlm.tokenizer import CharTokenizer

MAX_NEW_TOKENS = 10_000_000  # hours of generation even on a GPU: a larger count is a typo, not a plan


def check_settings(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int | None = None):
    if not temperature >= 0:  # nan fails too
        raise CharLMError(f"generate.temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= (vocab_size or top_k):
        limit = f"between 1 and the vocabulary size ({vocab_size})" if vocab_size else ">= 1"
        raise CharLMError(f"generate.top_k must be {limit}, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise CharLMError(f"generate.top_p must be in (0, 1], got {top_p}")


@dataclass
class GenerationConfig:
    """How text is generated: --generate.* for predict, the training samples and the Python API.

    Args:
        max_new_tokens: characters to generate per prompt.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample from the k most likely characters only.
        top_p: sample from the smallest set of characters with this much probability.
        stop: cut each continuation after the first occurrence of this string.
        seed: the sampling seed; default a fresh one per predict run (printed), 0 for training samples.
        compile: compile the one-token decode step as one graph, replayed as a CUDA graph on a GPU
            (torch.compile, mode reduce-overhead; each batch size compiles once). Off by default: on an
            H100 it is 5.4x eager at batch 1 but takes ~30 s to compile. Training samples stay eager.
    """

    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    stop: str | None = None
    seed: int | None = None
    compile: bool = False

    def __post_init__(self):
        number, integer = ((int, float), "a number"), (int, "an integer")
        kinds = {"max_new_tokens": integer, "temperature": number, "top_k": integer, "top_p": number}
        kinds |= {"stop": (str, "a string"), "seed": integer, "compile": (bool, "true or false")}
        for name, (kind, words) in kinds.items():  # the Python API's arguments (the command line's are typed)
            value = getattr(self, name)
            optional = name in ("top_k", "top_p", "stop", "seed")
            wrong_kind = not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
            if (value is None and not optional) or (value is not None and wrong_kind):
                raise CharLMError(f"generate.{name} must be {words}{' or None' * optional}, got {value!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise CharLMError(
                f"generate.max_new_tokens must be between 1 and {MAX_NEW_TOKENS:,}, got {self.max_new_tokens}"
            )
        check_settings(self.temperature, self.top_k, self.top_p)
        if self.stop == "":
            raise CharLMError("generate.stop is empty: give a string, or leave it out")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator takes
            raise CharLMError(f"generate.seed must be between {-(2**63)} and {2**64 - 1}, got {self.seed}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, then outside the nucleus (the smallest set of the most
    likely tokens whose probability mass reaches top_p). logits: (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
        # A token is dropped when the tokens ranked above it already reach top_p on their own.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_k, top_p):
    """The next token of every row of logits (B, V), as (B, 1): argmax at temperature 0, else a sample of
    the filtered softmax by the exponential race, argmax(probs / noise) with noise (B, V) ~ Exp(1): the law
    of torch.multinomial, but with the noise drawn ahead, so a whole decode step (net and sampling) is one
    CUDA graph. Also returns the logits' sum, finite only where every logit is: the caller adds these up and
    checks once at the end (no sync per token). A diverged model's nan logits still give a token here
    (argmax picks a nan), never a device assert, as torch.multinomial's would on CUDA."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True), logits.sum()
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return (probs / noise).argmax(-1, keepdim=True), logits.sum()


def sample_step(model, token, pos, cache, length, noise, temperature, top_k, top_p, slices=1):
    """One token of every row after `token` (B, 1) at `pos` with the cache (GPT.decode_step), sampled with
    `noise` (B, V): fixed shapes and no host sync, so net and sampling compile as one graph."""
    return pick(model.decode_step(token, pos, cache, length, slices), noise, temperature, top_k, top_p)


# One graph for the whole step (fullgraph: a graph break would fail loudly), replayed as a CUDA graph.
# dynamic=False: one static graph per batch size; a dynamic one would be re-recorded for every new shape.
COMPILE = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
STOP_CHECK_EVERY = 8  # tokens between checks of the stop string: each check waits for the device
NOISE_ROUNDS = 64  # tokens whose sampling noise is drawn at once: one op per token instead of three


@torch.no_grad()
def decode(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    use_cache: bool = True,
    stop_ids: list[int] | None = None,
    interrupted: Callable[[], bool] | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """The generation loop: yields the next token of every row of idx (B, T), as (B, 1), up to
    max_new_tokens times (fewer once every row has produced `stop_ids`, or when `interrupted()`).

    A prompt longer than block_size is cut to its last block_size tokens. With learned positions the
    context is then at most block_size tokens: when it would overflow it slides by a quarter block at once
    (keeping the last 3/4), so a KV cache is refilled once per quarter block instead of at every token;
    positions count from the window's start, exactly as in training. With rotary positions (`model.slides`)
    past block_size every layer attends over a sliding window of the last block_size positions (as
    Mistral's sliding-window attention): with the cache a new token's keys and values replace the oldest
    in a ring, never refilled; without it, a forward over the last `model.reach` + 1 tokens with a band
    mask computes the same. Either way the cached and uncached paths compute the same function, and draw
    the same noise, so their outputs are equal token for token (greedy always; sampled up to rounding).
    With the cache, a window is prefilled in one forward, then each token is one `sample_step` (fixed
    shapes, the position a device tensor), compiled and CUDA-graphed when `compile`.
    """
    block, slides, vocab = model.block_size, getattr(model, "slides", False), model.vocab_size
    cache = model.new_cache() if use_cache and hasattr(model, "new_cache") else None
    step_fn = _sample_step(model, compile) if cache is not None else None
    # Batch 1 on a CPU: each weight's matrix-vector product split across the cores (gpt.add_product)
    slices = torch.get_num_threads() if idx.device.type == "cpu" and idx.size(0) == 1 else 1
    keep = max(1, block - block // 4)
    start, fed = max(0, idx.size(1) - block), 0  # window start; positions cached since the last prefill
    stop = torch.tensor(stop_ids or [], device=idx.device)
    prompt_len, rows = idx.size(1), idx.size(0)
    done = torch.zeros(rows, dtype=torch.bool, device=idx.device)
    total = torch.zeros((), device=idx.device)  # the logits' sum: checked once at the end, no sync per token
    noise = None  # not drawn for greedy decoding
    for step in range(max_new_tokens):
        if interrupted is not None and interrupted():  # a signal: stop here and keep what is generated
            break
        if slides:  # the band reaches back `reach` tokens (no further than the cut prompt)
            start = max(start, idx.size(1) - model.reach - 1)
        elif idx.size(1) - start > block:
            start, fed = idx.size(1) - keep, 0
            if cache is not None:  # refilled in the same buffers: a CUDA graph keeps their addresses
                cache.pos = 0
        if temperature > 0:
            if step % NOISE_ROUNDS == 0:  # Exp(1), clamped above 0: a 0 would make probs / noise nan
                draws = torch.empty(NOISE_ROUNDS, rows, vocab, device=idx.device)
                if isinstance(generator, list):  # a stream per row: its text owes nothing to the others
                    for row, row_generator in zip(draws.unbind(1), generator, strict=True):
                        row.exponential_(generator=row_generator)
                else:
                    draws.exponential_(generator=generator)
                draws.clamp_min_(torch.finfo(draws.dtype).tiny)
            noise = draws[step % NOISE_ROUNDS]
        window = idx[:, start:]
        if cache is None or fed == 0:  # no cache, or a prefill of the whole window
            logits = model(window, cache=cache)[:, -1] if cache is not None else model(window)[:, -1]
            token, checksum = pick(logits, noise, temperature, top_k, top_p)
            if cache is not None:
                fed = window.size(1)
                pos = torch.full((1,), fed, device=idx.device)
        else:  # the newest token, at position `pos` (== fed); `pos` moves on the device: no host sync
            if fed == 2 * block:  # rotary: keep positions below 2 * block (GPT.shift_cache)
                model.shift_cache(cache)
                pos, fed = pos - block, fed - block
            # `token` (B, 1), the newest, sampled last round: not a view of idx, whose stride grows each
            # round (a new stride would make the compiled step recompile, and CUDA graphs re-record).
            length = None if compile else min(fed + 1, block)
            token, checksum = step_fn(
                model, token, pos, cache, length, noise, temperature, top_k, top_p, slices
            )
            if compile:  # the token lives in the CUDA graph's memory, rewritten by the next replay it feeds
                token = token.clone()
            pos, fed = pos + 1, fed + 1  # a new tensor: a CUDA graph may still hold the old one
        total += checksum
        idx = torch.cat([idx, token], dim=1)
        yield token
        if len(stop) and idx.size(1) - prompt_len >= len(stop):  # the stop string within the continuation
            done |= (idx[:, -len(stop) :] == stop).all(-1)
            if step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and done.all():
                break
    if not total.isfinite():
        raise CharLMError(
            "the model's outputs are not finite (nan or inf): it diverged, it cannot be sampled"
        )


def _sample_step(model: nn.Module, compile: bool):
    """sample_step, compiled once per model when asked (each batch size and setting compiles once)."""
    if not compile:
        return sample_step
    if getattr(model, "_compiled_sample_step", None) is None:
        model._compiled_sample_step = torch.compile(sample_step, **COMPILE)
    return model._compiled_sample_step  # called without `length`: fixed shapes, the mask instead


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *args, **kwargs) -> torch.Tensor:
    """idx (B, T) extended by up to max_new_tokens tokens of `decode` (same arguments): (B, T + n)."""
    return torch.cat([idx, *decode(model, idx, max_new_tokens, *args, **kwargs)], dim=1)


def row_seed(seed: int, prompt: str, sample: int) -> int:
    """The seed of one continuation: of the run's seed, the prompt and which of its samples (0 the first)
    it is, and nothing else, so a prompt's text is the same whatever other prompts, batches or ranks there
    are. A digest of all three: Python's hash() of an int wraps at 2**61 - 1 (and maps -1 to -2)."""
    text = f"{seed}|{sample}|{prompt}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _prepare(model, tokenizer, prompts, settings: GenerationConfig, use_cache, interrupted):
    """The encoded prompts (an empty one starts from a newline, on the model's device) and
    `steps(idx, rows)`: `decode` of idx with the settings, the stop string's ids and, with a seed, a
    generator per row seeded from (settings.seed, prompt, sample) of `rows`."""
    s = settings
    check_settings(s.temperature, s.top_k, s.top_p, len(tokenizer))
    device = next(model.parameters()).device
    encoded = [
        (tokenizer.encode(p).long() if p else torch.tensor([tokenizer.start_id])).to(device) for p in prompts
    ]
    try:
        stop_ids = tokenizer.encode(s.stop).tolist() if s.stop else None
    except CharLMError as err:
        raise CharLMError(f"the stop string {s.stop!r} cannot be generated: {err}") from None

    def steps(idx: torch.Tensor, rows: list[tuple[str, int]]) -> Iterator[torch.Tensor]:
        generators = None
        if s.seed is not None:  # asking for more tokens extends each text: the noise comes 64 tokens a round
            generators = [torch.Generator(device=device).manual_seed(row_seed(s.seed, *r)) for r in rows]
        return decode(
            model, idx, s.max_new_tokens, s.temperature, s.top_k, s.top_p, generators, use_cache, stop_ids,
            interrupted, s.compile,
        )  # fmt: skip

    return encoded, steps


def stream_text(
    model: nn.Module,
    tokenizer: CharTokenizer,
    prompt: str,
    settings: GenerationConfig,
    use_cache: bool = True,
    interrupted: Callable[[], bool] | None = None,
    sample: int = 0,
) -> Iterator[str]:
    """The continuation of one prompt (its `sample`-th, 0 the first), a character at a time as it is
    generated, ending after `stop`. Joined, it is sample_text's text for the same settings."""
    encoded, steps = _prepare(model, tokenizer, [prompt], settings, use_cache, interrupted)
    text, decode = "", tokenizer.stream_decoder()
    for token in steps(encoded[0][None], [(prompt, sample)]):
        piece = decode(token[0])
        text += piece
        yield piece
        if settings.stop and text.endswith(settings.stop):
            return
    if rest := decode(None):  # bytes of an unfinished character: replaced, as sample_text does
        yield rest


def sample_text(
    model: nn.Module,
    tokenizer: CharTokenizer,
    prompts: list[str],
    settings: GenerationConfig,
    use_cache: bool = True,
    interrupted: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
    samples: list[int] | None = None,
) -> list[str]:
    """Continuations (without the prompt) of each prompt, cut after `settings.stop` if given; `progress` is
    called with the number of characters each step adds. `samples`: which sample of its prompt each one is
    (row_seed); by default its count of earlier equal prompts in the list, so repeats differ.

    Prompts are batched by length: learned absolute positions make left-padding incorrect, and equal
    lengths keep every row's window in step.
    """
    encoded, steps = _prepare(model, tokenizer, prompts, settings, use_cache, interrupted)
    if samples is None:
        samples = sample_numbers(prompts)
    stop, out = settings.stop, [""] * len(prompts)
    for length in sorted({len(e) for e in encoded}):
        rows = [i for i, e in enumerate(encoded) if len(e) == length]
        idx = torch.stack([encoded[i] for i in rows])
        tokens = []
        for token in steps(idx, [(prompts[i], samples[i]) for i in rows]):
            tokens.append(token)
            if progress is not None:
                progress(len(rows))
        res = torch.cat([idx, *tokens], dim=1)  # as generate(): no tokens (a signal at once) is fine
        for i, ids in zip(rows, res[:, length:], strict=True):
            text = tokenizer.decode(ids)
            out[i] = text[: text.index(stop) + len(stop)] if stop and stop in text else text
    return out
