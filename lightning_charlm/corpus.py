"""Where text comes from: a user path, $CHARLM_DATA_DIR, the user cache, or a verified download."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from lightning_charlm.errors import CharLMError

TINY_SHAKESPEARE = "tinyshakespeare.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_charlm"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(dest: Path) -> None:
    """Download to a temporary file beside `dest`, verify, then rename: never a half-written corpus."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as r:
            f.write(r.read())
        digest = _sha256(Path(tmp))
        if digest != TINY_SHAKESPEARE_SHA256:
            raise CharLMError(
                f"downloaded tiny Shakespeare has sha256 {digest}, expected {TINY_SHAKESPEARE_SHA256}"
            )
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def default_corpus() -> Path:
    """Tiny Shakespeare: $CHARLM_DATA_DIR, then the user cache, else downloaded once into the cache."""
    env = os.environ.get("CHARLM_DATA_DIR")
    if env and (Path(env) / TINY_SHAKESPEARE).is_file():
        return Path(env) / TINY_SHAKESPEARE
    cached = cache_dir() / TINY_SHAKESPEARE
    if cached.is_file():
        return cached
    try:
        _download(cached)
    except OSError as err:  # URLError is an OSError: offline, DNS, refused, timeout
        raise CharLMError(
            f"tiny Shakespeare is not available and could not be downloaded ({err}). Provide it one of three "
            f"ways: pass your own file with --data.path FILE; put {TINY_SHAKESPEARE} in the folder named by "
            f"$CHARLM_DATA_DIR; or copy it to {cached} (source: {TINY_SHAKESPEARE_URL})"
        ) from None
    return cached


def corpus_path(path: str | os.PathLike | None) -> Path:
    """The corpus file: `path`, or tiny Shakespeare when None; a missing path or a folder is a CharLMError."""
    p = default_corpus() if path is None else Path(path)
    if not p.exists():
        raise CharLMError(f"corpus file not found: {p}")
    if p.is_dir():
        raise CharLMError(f"corpus path is a directory, expected a UTF-8 text file: {p}")
    return p


def not_utf8(path: Path, byte: int, offset: int, reason: str) -> CharLMError:
    return CharLMError(
        f"corpus file is not UTF-8 text: {path} has byte 0x{byte:02x} at byte offset {offset} ({reason}); "
        "convert it with e.g. `iconv -t UTF-8`"
    )


def read_corpus(path: str | os.PathLike | None) -> str:
    """The corpus as one string; a missing, empty or non-UTF-8 file is a CharLMError."""
    p = corpus_path(path)
    raw = p.read_bytes()
    if not raw:
        raise CharLMError(f"corpus file is empty: {p}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(p, raw[err.start], err.start, err.reason) from None
