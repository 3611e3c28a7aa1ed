"""Large corpora: the first launch prepares the token cache (one streaming pass), later launches map it.
For each size, a generated UTF-8 corpus (tiny Shakespeare repeated, with a line of non-ASCII text every
1,000 lines), dropped from the page cache first, as on a machine that has just written or copied it:

- first launch: `CharDataModule(path).splits` in a fresh process (reads, builds the vocabulary, writes the
  ids): seconds after the imports, and the process's peak RSS (imports included);
- later launch: the same (checks the cache, maps it): seconds and peak RSS;
- later launch of `charlm fit -c CONFIG --data.path FILE` to the end of its first training step, against
  the same command on tiny Shakespeare (benchmarks/startup.py's milestones).

    python benchmarks/corpus_load.py [--mb 100 1000] [--config configs/gpt-cpu.yaml]

Needs free disk of about twice the largest size (the corpus and its ids, in a temporary folder).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _env import describe
from startup import fit_milestones

from lightning_charlm.corpus import read_corpus

LOAD = """
import json, resource, sys, time
from lightning_charlm.data import CharDataModule
start = time.perf_counter()  # after the imports, which every launch pays alike
dm = CharDataModule(path=sys.argv[1], block_size=256)
train, val = dm.splits
print(json.dumps({"seconds": time.perf_counter() - start, "chars": len(train) + len(val),
                  "vocab": len(dm.vocab), "dtype": str(train.dtype).removeprefix("torch."),
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(path: Path, mb: int) -> None:
    lines = read_corpus(None).splitlines(keepends=True)
    lines[::1000] = ["Ünïcödé ✓ 世界 🙂\n"] * len(lines[::1000])
    block = "".join(lines).encode()
    with path.open("wb") as f:
        for _ in range(mb * 2**20 // len(block) + 1):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    drop_cache(path)


def drop_cache(path: Path) -> None:
    with path.open("rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def load(path: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(path)], env=env, check=True, capture_output=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, nargs="+", default=[100])
    ap.add_argument("--config", default="configs/gpt-cpu.yaml")
    args = ap.parse_args()
    quick = ("--trainer.limit_val_batches", "1")  # the run validates at its last step: not the whole split
    base = fit_milestones(args.config, quick)
    step, rss = "first training step done", "peak RSS (MB) by then"
    print(describe())
    print(f"tiny Shakespeare, fit -c {args.config}: {step} {base[step]:.2f} s, peak RSS {base[rss]:.0f} MB")
    print(f"{'corpus':>8} {'launch':>8} {'seconds':>8} {'peak RSS MB':>12}  notes")
    for mb in args.mb:
        with tempfile.TemporaryDirectory() as tmp:
            path, env = Path(tmp) / "big.txt", os.environ | {"XDG_CACHE_HOME": str(Path(tmp) / "cache")}
            write_corpus(path, mb)
            first = load(path, env)
            note = f"{first['chars']:,} chars, vocabulary {first['vocab']}, ids {first['dtype']}"
            print(
                f"{mb:>6}MB {'first':>8} {first['seconds']:>8.2f} {first['rss']:>12.0f}  {note}", flush=True
            )
            drop_cache(path)
            later = load(path, env)
            print(f"{mb:>6}MB {'later':>8} {later['seconds']:>8.2f} {later['rss']:>12.0f}", flush=True)
            fit = fit_milestones(args.config, (*quick, "--data.path", str(path)), env)
            extra = f"first step done; {fit[step] - base[step]:+.2f} s against tiny Shakespeare"
            print(f"{mb:>6}MB {'fit':>8} {fit[step]:>8.2f} {fit[rss]:>12.0f}  {extra}", flush=True)


if __name__ == "__main__":
    main()
