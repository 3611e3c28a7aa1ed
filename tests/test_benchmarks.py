"""benchmarks/gpu_check.py, the one command for every GPU figure, runs its code paths here on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU_CHECK = str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py")


def test_gpu_check_smoke(tmp_path):
    res = subprocess.run(
        [sys.executable, GPU_CHECK, "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads((tmp_path / "table.json").read_text())
    assert {r[0] for r in rows} == {"time to loss", "start-up", "throughput", "FSDP", "generation", "memory"}
    assert not [r for r in rows if r[1] == "FAILED"]
    values = {what: value for _, what, value in rows}
    assert values["100 steps, then --ckpt_path last to 150"] == "resumed, loss falls"
    assert any(
        v.startswith("step ") for w, v in values.items() if "val/loss <=" in w
    )  # the target was reached


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_check_full_mode_needs_a_gpu(tmp_path):
    res = subprocess.run([sys.executable, GPU_CHECK, "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr and "Traceback" not in res.stderr
