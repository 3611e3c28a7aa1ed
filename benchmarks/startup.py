"""Start-up: how long `charlm --help` takes, and how long `charlm fit -c CONFIG` takes from launch to the end
of its first training step, with the milestones in between (benchmarks/_timing.py), median of --repeats.

    python benchmarks/startup.py [--config configs/gpt-cpu.yaml] [--repeats 3]

Also times `import torch` and `import lightning` alone, the floor under every command.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHARLM = str(Path(sys.executable).with_name("charlm"))
# As on a user's machine: Python caches the project's compiled modules (some sandboxes turn that off).
USER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def seconds(cmd: list[str], **kwargs) -> float:
    start = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env=USER_ENV, **kwargs)
    return time.time() - start


def fit_milestones(config: str, extra: tuple[str, ...] = (), env: dict | None = None) -> dict[str, float]:
    """Seconds from launch to each milestone of `charlm fit -c CONFIG EXTRA` (one step), and its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        timing = Path(tmp) / "timing.json"
        env = (
            USER_ENV
            | (env or {})
            | {
                "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]),
                "CHARLM_LAUNCH": repr(time.time()),
                "CHARLM_TIMING": str(timing),
            }
        )
        timer = json.dumps([{"class_path": "_timing.StartupTimes"}])
        cmd = [
            CHARLM,
            "fit",
            "-c",
            str(REPO / config),
            "--trainer.max_steps",
            "1",
            "--trainer.callbacks",
            timer,
        ]
        cmd += ["--trainer.enable_progress_bar", "false", "--sample.every_n_steps", "0", *extra]
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp, env=env)
        return json.loads(timing.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt-cpu.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {
        "`charlm --help`": [seconds([CHARLM, "--help"]) for _ in range(args.repeats)],
        "`python -c 'import torch'`": [
            seconds([sys.executable, "-c", "import torch"]) for _ in range(args.repeats)
        ],
        "`python -c 'import lightning'`": [
            seconds([sys.executable, "-c", "import lightning"]) for _ in range(args.repeats)
        ],
    }
    runs = [fit_milestones(args.config) for _ in range(args.repeats)]
    for mark in runs[0]:
        rows[f"fit -c {args.config}: {mark}"] = [run[mark] for run in runs if mark in run]
    print(f"{'what':<76} {'median s':>9}  (all)")
    for what, values in rows.items():
        print(f"{what:<76} {statistics.median(values):>9.2f}  ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
