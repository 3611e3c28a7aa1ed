"""Generation speed: tokens/s with and without the KV cache, batch 1 and 16, 500 new tokens, for a GPT of
configs/gpt.yaml's size (6 layers, 6 heads, 384 wide, block 256; random weights: speed does not depend on
them), in the precision `charlm predict` uses (bf16 autocast on CUDA, fp32 on CPU). A first pass over every
setting warms up and is not counted. Runs on CUDA first when present, then on the CPU.

    python benchmarks/generate.py [--new-tokens 500] [--repeats 1]
"""

import argparse
import time

import torch
from _env import describe

from lightning_charlm.models import GPT, GPTConfig
from lightning_charlm.sampling import generate


def tokens_per_s(model, batch: int, new_tokens: int, use_cache: bool, device: str, repeats: int) -> float:
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
    best = 0.0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):  # as predict runs
            generate(model, prompt, new_tokens, temperature=1.0, use_cache=use_cache)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, batch * new_tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per setting; the best is kept")
    args = ap.parse_args()
    print(describe())
    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]  # the fastest first
    if len(devices) == 1:
        print("no CUDA device: GPU rows skipped")
    header = ("device", "precision", "batch", "no cache tok/s", "KV cache tok/s", "speed-up")
    print("{:>6} {:>10} {:>5} {:>15} {:>15} {:>9}".format(*header))
    for device in devices:
        torch.manual_seed(0)
        precision = "bf16-mixed" if device == "cuda" else "32-true"
        model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0))
        model = model.to(device).eval()
        settings = [(b, c) for b in (1, 16) for c in (False, True)]
        for b, c in settings:  # warm-up: every length the timed passes will see
            tokens_per_s(model, b, args.new_tokens, c, device, 1)
        for b in (1, 16):
            plain = tokens_per_s(model, b, args.new_tokens, False, device, args.repeats)
            cached = tokens_per_s(model, b, args.new_tokens, True, device, args.repeats)
            row = f"{device:>6} {precision:>10} {b:>5} {plain:>15.0f} {cached:>15.0f}"
            print(f"{row} {cached / plain:>8.1f}x")


if __name__ == "__main__":
    main()
