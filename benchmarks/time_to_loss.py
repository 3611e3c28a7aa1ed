"""Time to quality: launch `charlm fit -c CONFIG`, then read from its TensorBoard events when val/loss first
reached the target, measured from the launch of the process (start-up, data and validation included).

    python benchmarks/time_to_loss.py configs/gpt-cpu.yaml --target 1.80
    python benchmarks/time_to_loss.py configs/bigram.yaml --target 2.50
"""

import argparse
import glob
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import describe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CHARLM = str(Path(sys.executable).with_name("charlm"))


def launch(config: str, overrides: list[str]) -> tuple[list, float, float, int]:
    """Run `charlm fit -c config *overrides` in a fresh folder: its val/loss events (with wall times), the
    launch time, the process's wall time and the last step that logged train/loss."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        cmd = [
            CHARLM,
            "fit",
            "-c",
            str(Path(config).resolve()),
            "--trainer.enable_progress_bar=false",
            *overrides,
        ]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        total = time.time() - start
        if proc.returncode:
            sys.exit(f"charlm failed:\n{proc.stderr[-3000:]}")
        ea = EventAccumulator(glob.glob(f"{tmp}/logs/*/version_0/events.out.tfevents.*")[0])
        ea.Reload()
        return ea.Scalars("val/loss"), start, total, ea.Scalars("train/loss")[-1].step + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--target", type=float, required=True, help="val/loss to reach")
    args, overrides = ap.parse_known_args()  # the rest goes to charlm, e.g. --trainer.max_steps=500
    val, start, total, _ = launch(args.config, overrides)
    print(describe())
    print(f"config {args.config} {' '.join(overrides)}")
    print(f"{'step':>6} {'val/loss':>9} {'seconds since launch':>21}")
    for e in val:
        print(f"{e.step + 1:>6} {e.value:>9.4f} {e.wall_time - start:>21.1f}")
    hit = next((e for e in val if e.value <= args.target), None)
    best = min(val, key=lambda e: e.value)
    reached = f"at step {hit.step + 1}, {hit.wall_time - start:.1f} s after launch" if hit else "never"
    print(
        f"val/loss <= {args.target}: {reached}; best {best.value:.4f} at step {best.step + 1}; "
        f"process wall time {total:.1f} s"
    )


if __name__ == "__main__":
    main()
