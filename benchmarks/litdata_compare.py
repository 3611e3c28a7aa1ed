"""Lightning's LitData against charlm's token cache, for charlm's workload (batches of random windows of one
token stream), on one machine, each step in a fresh process:

Seconds count from after the imports.

- prepare: charlm's first launch (`CharDataModule(path).splits`) vs `litdata.optimize` with a TokensLoader
  (the same tokenizer, one worker: one input file), seconds and peak RSS (worker processes included);
- later launch to the first batch: the cache mapped + `RandomWindows` vs `StreamingDataset` +
  `StreamingDataLoader` over the optimized chunks, shuffled;
- batches per second after the first, B windows of T + 1 tokens each.

    pip install litdata   # not one of charlm's dependencies
    python benchmarks/litdata_compare.py [--mb 100] [--batch 64] [--block 256] [--batches 300]

What the numbers leave out: LitData's TokensLoader serves fixed, non-overlapping blocks (an epoch sees each
once, shuffled), where charlm draws windows at any offset; LitData reads from s3:// and other object
stores, which the token cache does not.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _env import describe
from corpus_load import write_corpus

COMMON = """
import json, resource, sys, time
start = time.perf_counter()
def done(**extra):
    rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"seconds": time.perf_counter() - start, "rss": rss / 1024, **extra}))
path, out, batch, block, batches = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
"""

OURS_PREPARE = """
from lightning_charlm.data import CharDataModule
start = time.perf_counter()  # after the imports, here and below
CharDataModule(path=path).splits
done()
"""

OURS_READ = """
from lightning_charlm.data import CharDataModule, RandomWindows
start = time.perf_counter()
train, _ = CharDataModule(path=path).splits
it = iter(RandomWindows(train, block, batch, seed=0))
next(it)
first = time.perf_counter() - start
for _ in range(batches):
    x, y = next(it)
done(first=first, rate=batches / (time.perf_counter() - start - first))
"""

LIT_PREPARE = """
import litdata
from lightning_charlm.data import CharDataModule
from litdata_compare import Encoder
encode = Encoder(CharDataModule(path=path).vocab)  # from charlm's cache: LitData is timed on the ids alone
start = time.perf_counter()
litdata.optimize(fn=encode, inputs=[path], output_dir=out, chunk_bytes="64MB",
                 item_loader=litdata.TokensLoader(), num_workers=1, verbose=False)
chunks = json.load(open(f"{out}/index.json"))["chunks"]
assert chunks, "litdata wrote no chunks: its worker failed (the error is above)"
done(chunks=len(chunks))
"""

LIT_READ = """
import litdata
start = time.perf_counter()
ds = litdata.StreamingDataset(out, item_loader=litdata.TokensLoader(block_size=block + 1), shuffle=True,
                              drop_last=True)
it = iter(litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=1))
next(it)
first = time.perf_counter() - start
for _ in range(batches):
    chunk = next(it).long()
    x, y = chunk[:, :-1], chunk[:, 1:]
done(first=first, rate=batches / (time.perf_counter() - start - first), blocks=len(ds))
"""


class Encoder:
    """LitData's fn: a file's ids in pieces (its workers are spawned processes: this travels by pickle)."""

    def __init__(self, vocab: str):
        self.vocab = vocab

    def __call__(self, file: str):
        from lightning_charlm.prepared import _texts
        from lightning_charlm.tokenizer import CharTokenizer

        tok = CharTokenizer(self.vocab)
        for text in _texts(Path(file)):
            yield tok.encode(text)


def run(code: str, *args) -> dict:
    here = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"XDG_CACHE_HOME": str(args[1].parent / "cache"), "PYTHONPATH": here}
    cmd = [sys.executable, "-c", COMMON + code, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args()
    try:
        import litdata
    except ImportError:
        raise SystemExit("litdata is not installed: pip install litdata") from None
    print(describe(), f"| litdata {litdata.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "big.txt", Path(tmp) / "optimized"
        write_corpus(path, args.mb)
        a = (path, out, args.batch, args.block, args.batches)
        rows = [
            ("charlm: prepare", run(OURS_PREPARE, *a)),
            ("litdata: optimize", run(LIT_PREPARE, *a)),
            ("charlm: later launch, batches", run(OURS_READ, *a)),
            ("litdata: later launch, batches", run(LIT_READ, *a)),
        ]
    print(f"{args.mb} MB corpus; batches of {args.batch} x {args.block + 1} tokens")
    print(f"{'what':<32} {'seconds':>8} {'peak RSS MB':>12} {'first batch s':>14} {'batches/s':>10}")
    for what, r in rows:
        first = f"{r['first']:.2f}" if "first" in r else "-"
        rate = f"{r['rate']:.0f}" if "rate" in r else "-"
        print(f"{what:<32} {r['seconds']:>8.2f} {r['rss']:>12.0f} {first:>14} {rate:>10}")


if __name__ == "__main__":
    main()
