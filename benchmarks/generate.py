"""Generation speed of a GPT of configs/gpt.yaml's size (6 layers, 6 heads, 384 wide, block 256; random
weights: speed does not depend on them) in the precision `charlm predict` uses (bf16 autocast on CUDA, fp32
elsewhere), from a 1-token prompt, after a warm-up pass of every setting:

- tokens/s with the KV cache and without it (on a CPU the uncached row only at batch 1: minutes beyond),
- the median time of one decode step (what a reader of streamed text waits per character), and
- the floor: a bare chain of the net's weight matrix-vector products per token (every Linear once, batch 1),
  the rate at which this device can stream the weights; the cached batch-1 rate is compared with it.

    python benchmarks/generate.py [--device cuda] [--batches 1 16 256] [--new-tokens 500] [--repeats 1]

Without --device: every device present, the fastest first (CUDA, MPS, then the CPU).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _env import describe

from lightning_charlm.models import GPT, GPTConfig
from lightning_charlm.sampling import decode


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def run(model, batch: int, new_tokens: int, use_cache: bool, device: str) -> tuple[float, float]:
    """(tokens/s over the whole run, median seconds per decode step)."""
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
    steps, stamps = decode(model, prompt, new_tokens, temperature=1.0, use_cache=use_cache), []
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):  # as predict runs
        sync(device)
        start = time.perf_counter()
        for _ in steps:
            stamps.append(time.perf_counter())
        sync(device)
        total = time.perf_counter() - start
    gaps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    return batch * new_tokens / total, statistics.median(gaps)


def gemv_floor(model: GPT, device: str, iters: int = 200) -> float:
    """Seconds per token for one matrix-vector product with every Linear weight of the net (batch 1)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weights = [w.to(dtype) for w in weights]
    inputs = {w.size(1): torch.randn(1, w.size(1), device=device, dtype=dtype) for w in weights}
    with torch.no_grad():
        for _ in range(10):
            for w in weights:
                F.linear(inputs[w.size(1)], w)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            for w in weights:
                F.linear(inputs[w.size(1)], w)
        sync(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "mps", "cpu"], help="default: every device present")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per setting; the best is kept")
    args = ap.parse_args()
    print(describe())
    present = ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available() + ["cpu"]
    header = ("device", "batch", "no cache tok/s", "KV cache tok/s", "speed-up", "ms/step (median)")
    print("{:>6} {:>5} {:>15} {:>15} {:>9} {:>17}".format(*header))
    for device in [args.device] if args.device else present:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0))
        model = model.to(device).eval()
        settings = [(b, c) for b in args.batches for c in (False, True) if c or device != "cpu" or b == 1]
        for b, c in settings:  # warm-up: every shape the timed passes will see (past a window slide)
            run(model, b, min(args.new_tokens, 300), c, device)
        rates = {}
        for b, c in settings:
            rates[b, c] = max(
                (run(model, b, args.new_tokens, c, device) for _ in range(args.repeats)), key=lambda r: r[0]
            )
        for b in args.batches:
            cached, step = rates[b, True]
            plain = f"{rates[b, False][0]:>15.0f}" if (b, False) in rates else f"{'-':>15}"
            gain = f"{cached / rates[b, False][0]:>8.1f}x" if (b, False) in rates else f"{'-':>9}"
            print(f"{device:>6} {b:>5} {plain} {cached:>15.0f} {gain} {step * 1e3:>17.2f}")
        floor = min(gemv_floor(model, device) for _ in range(args.repeats))  # best of as many as the rates
        line = f"{device:>6} floor: weight GEMV chain {floor * 1e3:.2f} ms/token = {1 / floor:.0f} tok/s"
        if (1, True) in rates:
            line += f"; the KV cache at batch 1 reaches {rates[1, True][0] * floor:.2f}x of it"
        print(line)
        if (1, True) in rates and (16, True) in rates:
            print(f"{device:>6} batch 16 / batch 1, cached: {rates[16, True][0] / rates[1, True][0]:.1f}x")


if __name__ == "__main__":
    main()
