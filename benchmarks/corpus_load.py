"""Corpus loading: read, build the vocabulary, encode and split a 100 MB UTF-8 file with CharDataModule,
reporting the wall time and the peak memory above what the process held before loading.

    python benchmarks/corpus_load.py [--mb 100]

The file is tiny Shakespeare repeated (from $CHARLM_DATA_DIR, the cache or the download), with a line of
non-ASCII text every 1,000 lines so the vocabulary is not plain ASCII. It is written to a temporary folder
and dropped from the page cache (posix_fadvise), so the read is from disk, as at a first launch.
"""

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from _env import describe

from lightning_charlm.corpus import read_corpus
from lightning_charlm.data import CharDataModule


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100)
    args = ap.parse_args()
    lines = read_corpus(None).splitlines(keepends=True)
    lines[::1000] = ["Ünïcödé ✓ 世界 🙂\n"] * len(lines[::1000])
    block = "".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        with path.open("w", encoding="utf-8") as f:
            for _ in range(args.mb * 2**20 // len(block.encode()) + 1):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        size = path.stat().st_size
        del lines, block
        before = rss_mb()
        start = time.perf_counter()
        dm = CharDataModule(path=str(path), block_size=256)
        train, val = dm.splits
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(describe())
    header = ("file MB", "chars", "vocab", "dtype", "seconds", "peak extra MB", "held MB")
    print("{:>8} {:>12} {:>6} {:>6} {:>8} {:>14} {:>8}".format(*header))
    chars = len(train) + len(val)
    held = (train.nbytes + val.nbytes) / 2**20
    dtype = str(train.dtype).replace("torch.", "")
    print(
        f"{size / 2**20:>8.1f} {chars:>12,} {len(dm.vocab):>6} {dtype:>6} {seconds:>8.2f} "
        f"{peak - before:>14.0f} {held:>8.0f}"
    )


if __name__ == "__main__":
    main()
