"""Shared fixtures: the tiny Shakespeare copy beside the repo, small corpora, and the real console script."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "CHARLM_DATA_DIR" not in os.environ and (SHARED_DATA / "tinyshakespeare.txt").is_file():
    os.environ["CHARLM_DATA_DIR"] = str(SHARED_DATA)
CHARLM = str(Path(sys.executable).with_name("charlm"))  # the installed console script of this environment


def tiny_shakespeare() -> Path | None:
    p = Path(os.environ.get("CHARLM_DATA_DIR", "")) / "tinyshakespeare.txt"
    return p if p.is_file() else None


needs_shakespeare = pytest.mark.skipif(tiny_shakespeare() is None, reason="tiny Shakespeare not available")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path)


def make_corpus(folder: Path) -> Path:
    """A 6,000-character corpus with real structure (repeated words), so a small model learns it fast."""
    rng = random.Random(0)
    words = ["the", "king", "queen", "shall", "not", "love", "speak", "night", "my", "lord", "and", "to"]
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize() + "." for _ in range(220)
    ]
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines)[:6000] + "\n", encoding="utf-8")
    return path


def run_charlm(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    full_env = os.environ | {"PYTHONWARNINGS": "ignore"} | (env or {})
    return subprocess.run(
        [CHARLM, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
