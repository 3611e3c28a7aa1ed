"""Generation speed of a GPT of configs/gpt.yaml's size (6 layers, 6 heads, 384 wide, block 256; random
weights: speed does not depend on them) in the precision `charlm predict` uses (bf16 autocast on CUDA, fp32
elsewhere), from a 1-token prompt, after a warm-up pass of every setting:

- tokens/s with the KV cache and without it (on a CPU the uncached row only at batch 1: minutes beyond),
- the median time of one decode step (what a reader of streamed text waits per character), and
- the floor: a bare chain of the net's weight matrix-vector products per token (every Linear once, batch 1),
  the rate at which this device can stream the weights, measured beside each batch-1 pass; the cached
  batch-1 rate is compared with it. On a CPU twice: with F.linear (MKL runs a matrix-vector product on one
  core) and as the decode step runs it, each weight's rows split into a slice per core (gpt.add_product),
- with --compile, the cached rows again with the compiled decode step (--generate.compile true; its compile
  time is in the warm-up pass, not in the rate).

    python benchmarks/generate.py [--device cuda] [--batches 1 16 256] [--new-tokens 500] [--repeats 1]
                                  [--compile]

Without --device: every device present, the fastest first (CUDA, MPS, then the CPU).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _env import describe

from lightning_charlm.models import GPT, GPTConfig
from lightning_charlm.models.gpt import add_product
from lightning_charlm.sampling import decode


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def run(model, batch: int, new_tokens: int, mode: str, device: str) -> tuple[float, float]:
    """(tokens/s over the whole run, median seconds per decode step); mode: plain, cache or compiled."""
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
    kw = {"use_cache": mode != "plain", "compile": mode == "compiled"}
    steps, stamps = decode(model, prompt, new_tokens, temperature=1.0, **kw), []
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):  # as predict runs
        sync(device)
        start = time.perf_counter()
        for _ in steps:
            stamps.append(time.perf_counter())
        sync(device)
        total = time.perf_counter() - start
    gaps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    return batch * new_tokens / total, statistics.median(gaps)


def gemv_floor(model: GPT, device: str, iters: int = 200) -> tuple[float, float]:
    """Seconds per token for one matrix-vector product with every Linear weight of the net (batch 1): as
    F.linear computes it, and as the decode step does (gpt.add_product: on a CPU each weight's rows split
    into one slice per core; elsewhere the same product)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weights = [w.to(dtype) for w in weights]
    inputs = {w.size(1): torch.randn(1, w.size(1), device=device, dtype=dtype) for w in weights}
    slices = torch.get_num_threads() if device == "cpu" else 1
    chains = (
        lambda: [F.linear(inputs[w.size(1)], w) for w in weights],
        lambda: [add_product(None, w, inputs[w.size(1)].t(), slices) for w in weights],
    )
    times = []
    with torch.no_grad():
        for chain in chains:
            for _ in range(10):
                chain()
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                chain()
            sync(device)
            times.append((time.perf_counter() - start) / iters)
    return times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "mps", "cpu"], help="default: every device present")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per setting; the best is kept")
    ap.add_argument("--compile", action="store_true", help="also the compiled decode step, cached rows")
    args = ap.parse_args()
    print(describe())
    present = ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available() + ["cpu"]
    header = ("device", "batch", "no cache tok/s", "KV cache tok/s", "speed-up", "ms/step (median)")
    header += ("compiled tok/s", "ms/step (median)") if args.compile else ()
    print(("{:>6} {:>5} {:>15} {:>15} {:>9} {:>17}" + " {:>15} {:>17}" * args.compile).format(*header))
    for device in [args.device] if args.device else present:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0))
        model = model.to(device).eval()
        modes = ["plain", "cache"] + ["compiled"] * args.compile
        settings = [(b, m) for b in args.batches for m in modes if m != "plain" or device != "cpu" or b == 1]
        for b, m in settings:  # warm-up: every shape the timed passes will see (past a window slide)
            start = time.perf_counter()
            run(model, b, min(args.new_tokens, 300), m, device)
            if m == "compiled":
                print(f"{device:>6} batch {b}: compiled and warmed up in {time.perf_counter() - start:.0f} s")
        rates, floors = {}, []
        for b, m in settings:
            passes = []
            for _ in range(args.repeats):
                passes.append(run(model, b, args.new_tokens, m, device))
                if (b, m) == (1, "cache"):  # the floor beside each pass: this VM's speed drifts by minutes
                    floors.append(gemv_floor(model, device))
            rates[b, m] = max(passes, key=lambda r: r[0])
        for b in args.batches:
            cached, step = rates[b, "cache"]
            plain = f"{rates[b, 'plain'][0]:>15.0f}" if (b, "plain") in rates else f"{'-':>15}"
            gain = f"{cached / rates[b, 'plain'][0]:>8.1f}x" if (b, "plain") in rates else f"{'-':>9}"
            compiled = ""
            if args.compile:
                compiled = f" {rates[b, 'compiled'][0]:>15.0f} {rates[b, 'compiled'][1] * 1e3:>17.2f}"
            print(f"{device:>6} {b:>5} {plain} {cached:>15.0f} {gain} {step * 1e3:>17.2f}{compiled}")
        floors = floors or [gemv_floor(model, device) for _ in range(args.repeats)]
        linear, sliced = (min(f[i] for f in floors) for i in (0, 1))  # best of as many as the rates
        chain = f"{device:>6} floor: weight GEMV chain"
        print(f"{chain} (F.linear) {linear * 1e3:.2f} ms/token = {1 / linear:.0f} tok/s")
        if device == "cpu":
            n = torch.get_num_threads()
            split = f"each weight's rows in {n} slices, one per core" if n > 1 else "one thread: unsplit"
            print(f"{chain} as decode runs it ({split}) {sliced * 1e3:.2f} ms/token = {1 / sliced:.0f} tok/s")
        if (1, "cache") in rates:
            cached = rates[1, "cache"][0]
            line = f"{device:>6} the KV cache at batch 1 reaches {cached * linear:.2f}x of the F.linear chain"
            print(line + (f", {cached * sliced:.2f}x of the sliced one" if device == "cpu" else ""))
        if (1, "cache") in rates and (16, "cache") in rates:
            ratio = rates[16, "cache"][0] / rates[1, "cache"][0]
            print(f"{device:>6} batch 16 / batch 1, cached: {ratio:.1f}x")


if __name__ == "__main__":
    main()
