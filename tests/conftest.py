"""Shared fixtures: the tiny Shakespeare copy beside the repo, small corpora, and the real console script."""

import atexit
import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "CHARLM_DATA_DIR" not in os.environ and (SHARED_DATA / "tinyshakespeare.txt").is_file():
    os.environ["CHARLM_DATA_DIR"] = str(SHARED_DATA)
# The suite's caches (records of checked files, prepared token files) in a folder of its own, removed at the
# end: never the user's ~/.cache, which may be read-only or hold a real cache the tests would disturb.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="charlm-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
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
    full_env = os.environ | (env or {})  # warnings stay visible: some are the sign of a real problem
    return subprocess.run(
        [CHARLM, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def charlm_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`charlm ARGS` run in this process through the console script's own main(), for tests that need no
    process of their own (a subprocess spends most of its time importing torch and Lightning). Returns what
    run_charlm returns; an uncaught exception is not turned into an exit code: it fails the test."""
    from lightning_charlm.cli import main

    out, err, code, home = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.chdir(home)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
