"""Where text comes from: a user path, $CHARLM_DATA_DIR, the user cache, or a verified download."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from lightning_charlm.errors import CharLMError

TINY_SHAKESPEARE = "tinyshakespeare.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
# The first 100,000,000 bytes of an English Wikipedia dump (the Hutter prize's); the unzipped file's SHA-1
# as Matt Mahoney's own table gives it.
ENWIK8 = "enwik8"
ENWIK8_SHA1 = "57b8363b814821dc9d47aa4d41f58733519076b2"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"


def _known() -> dict[str, tuple[str, str, str, str]]:
    """Corpora found by name: (what to call it, URL, hash algorithm, digest). Read at each call, so the
    URLs can be pointed elsewhere (the tests use local files)."""
    return {
        TINY_SHAKESPEARE: ("tiny Shakespeare", TINY_SHAKESPEARE_URL, "sha256", TINY_SHAKESPEARE_SHA256),
        ENWIK8: ("enwik8", ENWIK8_URL, "sha1", ENWIK8_SHA1),
    }


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_charlm"


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: Path) -> list[int]:
    """What changes whenever anything writes to the file, truncates it, or even resets its times: its
    ctime is set by the kernel and cannot be put back."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _checks(record: Path) -> dict:
    """The files `record` lists as checked: resolved path -> [stamp..., tag]."""
    try:
        checked = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return checked if isinstance(checked, dict) else {}


def unchanged_since_check(record: Path, path: Path, tag: str) -> bool:
    """Whether `path` is as it was when `record_check` last recorded it in `record` (checked against `tag`:
    a digest or CRC), so its full check can be skipped."""
    return _checks(record).get(str(path.resolve())) == [*file_stamp(path), tag]


def record_check(record: Path, path: Path, tag: str) -> None:
    """Records that `path`, as it is now, passed its full check against `tag`. Atomic (ranks may race); on a
    read-only cache nothing is recorded and every launch checks in full."""
    part = record.with_name(f"{record.name}.{os.getpid()}.part")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        entry = {str(path.resolve()): [*file_stamp(path), tag]}
        part.write_text(json.dumps(_checks(record) | entry), encoding="utf-8")
        os.replace(part, record)
    except OSError:
        part.unlink(missing_ok=True)


def _check_found(name: str, path: Path) -> Path:
    """A corpus found by name is the published file (results on another one would not be comparable): its
    digest is checked the first time, and again only when the file changed since (a record in the cache)."""
    label, url, algorithm, expected = _known()[name]
    record = cache_dir() / "checked.json"
    if unchanged_since_check(record, path, expected):
        return path
    digest = _digest(path, algorithm)
    if digest != expected:
        raise CharLMError(
            f"{path} is not the published {label}: its {algorithm} is {digest}, expected {expected} ({url}). "
            f"Remove it to download it again, or train on it as your own file: --data.path {path}"
        )
    record_check(record, path, expected)
    return path


def _download(name: str, dest: Path) -> None:
    """Download (and unzip) to a temporary file beside `dest`, verify, then rename: never a half-written
    corpus."""
    label, url, algorithm, expected = _known()[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    unzipped = Path(tmp + ".unzipped")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as r:
            shutil.copyfileobj(r, f, 1 << 20)
        got = Path(tmp)
        if url.endswith(".zip"):
            with zipfile.ZipFile(tmp) as z, z.open(name) as member, unzipped.open("wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
            got = unzipped
        digest = _digest(got, algorithm)
        if digest != expected:
            raise CharLMError(f"downloaded {label} has {algorithm} {digest}, expected {expected}")
        os.replace(got, dest)
    except (zipfile.BadZipFile, KeyError) as err:
        raise CharLMError(
            f"the download of {label} from {url} is not the expected zip file ({err})"
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
        unzipped.unlink(missing_ok=True)


def known_corpus(name: str) -> Path:
    """A corpus known by name: in $CHARLM_DATA_DIR, then the user cache, else downloaded once into the
    cache; checked against its published digest."""
    env = os.environ.get("CHARLM_DATA_DIR")
    if env and (Path(env) / name).is_file():
        return _check_found(name, Path(env) / name)
    cached = cache_dir() / name
    if cached.is_file():
        return _check_found(name, cached)
    label, url, _, _ = _known()[name]
    try:
        _download(name, cached)
    except OSError as err:  # URLError is an OSError: offline, DNS, refused, timeout
        raise CharLMError(
            f"{label} is not available and could not be downloaded ({err}). Provide it one of three "
            f"ways: pass your own file with --data.path FILE; put {name} in the folder named by "
            f"$CHARLM_DATA_DIR; or copy it to {cached} (source: {url})"
        ) from None
    return cached


def default_corpus() -> Path:
    """Tiny Shakespeare: $CHARLM_DATA_DIR, then the user cache, else downloaded once into the cache."""
    return known_corpus(TINY_SHAKESPEARE)


def corpus_path(path: str | os.PathLike | None) -> Path:
    """The corpus file: `path`, tiny Shakespeare when None, or a corpus known by name (`enwik8`) when no
    such file exists here; a missing path or a folder is a CharLMError."""
    p = default_corpus() if path is None else Path(path)
    if not p.exists() and str(path) in _known():  # a corpus known by name (enwik8): found or downloaded
        p = known_corpus(str(path))
    if not p.exists():
        raise CharLMError(f"corpus file not found: {p}")
    return p


def found_here(path: str | os.PathLike | None) -> bool:
    """Whether --data.path can name a corpus from this folder (a pattern: whether it matches a file)."""
    if path is not None and is_pattern(path):
        return next(_matches(path), None) is not None
    return path is None or Path(path).exists() or str(path) in _known()


def _matches(pattern: str | os.PathLike) -> Iterator[Path]:
    """The files a glob pattern matches (`**` crosses folders), as found."""
    return (p for p in map(Path, glob.iglob(str(pattern), recursive=True)) if p.is_file())


def is_pattern(path: str | os.PathLike) -> bool:
    """Whether --data.path is a glob pattern (and not a file whose name holds *, ? or [)."""
    return any(c in str(path) for c in "*?[") and not Path(path).exists()


def corpus_files(path: str | os.PathLike | None) -> list[Path]:
    """The corpus's files, in sorted order: one file; every file under a folder (at any depth, hidden ones
    left out); or every file a glob pattern matches (`**` crosses folders)."""
    if path is not None and is_pattern(path):
        files = sorted(_matches(path))
        if not files:
            raise CharLMError(f"no file matches the corpus pattern {path}")
        return files
    p = corpus_path(path)
    if not p.is_dir():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and not _hidden(f.relative_to(p)))
    if not files:
        raise CharLMError(f"the corpus folder {p} holds no files")
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def not_utf8(path: Path, byte: int, offset: int, reason: str) -> CharLMError:
    return CharLMError(
        f"corpus file is not UTF-8 text: {path} has byte 0x{byte:02x} at byte offset {offset} ({reason}); "
        "convert it with e.g. `iconv -t UTF-8`, or train on its bytes with --data.unit byte"
    )


def read_corpus(path: str | os.PathLike | None) -> str:
    """The corpus as one string; a missing, empty or non-UTF-8 file is a CharLMError."""
    p = corpus_path(path)
    if p.is_dir():
        raise CharLMError(f"corpus path is a directory, expected a UTF-8 text file: {p}")
    raw = p.read_bytes()
    if not raw:
        raise CharLMError(f"corpus file is empty: {p}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(p, raw[err.start], err.start, err.reason) from None
