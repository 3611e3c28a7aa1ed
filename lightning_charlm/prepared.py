"""Large corpora, and corpora of several files, are encoded once. The first launch reads the files in a
streaming pass with bounded memory and writes their ids (uint8 when the vocabulary fits, else int16/int32)
and vocabulary to the cache folder; later launches memory-map the ids, so neither start-up nor memory grows
with the corpus, and every rank maps the same file. A single file under PREPARE_MIN_BYTES is read directly
(encoding a few MB costs less than checking a cache); a single file read as bytes is its own token file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import torch

from lightning_charlm.corpus import cache_dir, not_utf8, record_check, unchanged_since_check
from lightning_charlm.errors import CharLMError
from lightning_charlm.tokenizer import BYTE_VOCAB, ByteTokenizer, CharTokenizer

log = logging.getLogger("lightning_charlm")
PREPARE_MIN_BYTES = int(os.environ.get("CHARLM_PREPARE_MIN_BYTES", 32 << 20))
CHUNK = 16 << 20  # bytes read at a time: what preparing holds, whatever the corpus size
DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}
FORMAT = 1  # bumped when the files' layout changes: older caches are then rebuilt
SEPARATOR = "\n"  # between the files of a corpus made of several


def prepared_ids(files: list[Path], byte: bool = False) -> tuple[str, torch.Tensor]:
    """(vocabulary, ids) of the corpus made of `files` (joined by SEPARATOR), as characters or bytes, the
    ids memory-mapped from the cache, which is prepared first when it is missing, stale (a file changed) or
    damaged (checked in full whenever the ids file changed since its last check)."""
    folder = cache_dir() / "tokens" / _key(files, byte)
    meta = _valid_meta(folder)
    if meta is None:
        meta = _prepare(files, folder, byte)
    ids = torch.from_file(
        str(folder / "ids.bin"), shared=False, size=meta["count"], dtype=DTYPES[meta["dtype"]]
    )
    return meta["vocab"], ids


def _key(files: list[Path], byte: bool) -> str:
    """Names the cache of these files as they are now: their paths, sizes, modification times, and a hash
    of each one's first and last MB (an edit that keeps the size and restores the time still changes
    those, mostly)."""
    h = hashlib.sha1(f"{FORMAT}|{'byte' if byte else 'char'}".encode())
    for path in files:
        st = path.stat()
        h.update(f"|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:20]


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _valid_meta(folder: Path) -> dict | None:
    """The cache's description if its ids are whole and unchanged, else None. The CRC-32 of the whole file
    (0.7 s a GB) is computed only when the file changed since it was last checked."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        ids, record, crc = folder / "ids.bin", folder / "checked.json", str(meta["crc32"])
        itemsize = torch.empty(0, dtype=DTYPES[meta["dtype"]]).element_size()
        if ids.stat().st_size == meta["count"] * itemsize:
            if unchanged_since_check(record, ids, crc):
                return meta
            if _crc(ids) == meta["crc32"]:
                record_check(record, ids, crc)
                return meta
        log.warning("charlm: the prepared corpus in %s is damaged; preparing it again", folder)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("charlm: the prepared corpus in %s is unreadable; preparing it again", folder)
    return None


def _texts(path: Path, advance=lambda n: None):
    """The file's text in pieces of about CHUNK bytes, each cut before a character's first byte, so a
    decoding error names its exact byte offset in the file; `advance` gets the bytes read."""
    offset, carry = 0, b""
    with path.open("rb") as f:
        while True:
            raw = f.read(CHUNK)
            advance(len(raw))
            data, last = carry + raw, not raw
            cut = len(data)
            if not last and data:  # the last character (it may be cut short) waits for the next piece
                cut -= 1
                while cut > len(data) - 4 and cut > 0 and data[cut] & 0xC0 == 0x80:  # 10xxxxxx: not a start
                    cut -= 1
            try:
                yield data[:cut].decode("utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8(path, data[err.start], offset + err.start, err.reason) from None
            offset, carry = offset + cut, data[cut:]
            if last:
                return


def _pieces(files: list[Path], byte: bool, advance=lambda n: None):
    """The corpus in pieces of about CHUNK bytes, SEPARATOR between files: str, or bytes when `byte`;
    `advance` gets the bytes read."""
    sep = SEPARATOR.encode() if byte else SEPARATOR
    for i, path in enumerate(files):
        if i:
            yield sep
        if not byte:
            yield from _texts(path, advance)
            continue
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                advance(len(block))
                yield block


@contextlib.contextmanager
def _bar(total: int):
    """`advance(bytes)` for a bar on stderr while a corpus is prepared (a GB takes a minute), when stderr is
    a terminal; a no-op elsewhere (logs and pipes get the one 'preparing' line)."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("preparing"), BarColumn(bar_width=20), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr)) as progress:
        task = progress.add_task("", total=total)
        yield lambda n: progress.advance(task, n)


def _prepare(files: list[Path], folder: Path, byte: bool) -> dict:
    size = sum(p.stat().st_size for p in files)
    where = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]} ...)"
    log.warning("charlm: preparing %s (%.0f MB) once; later launches map it", where, size / 1e6)
    passes = 1 if byte else 2  # characters: one pass for the vocabulary, one to encode
    with _bar(passes * size) as advance:
        if byte:
            tok = ByteTokenizer()
        else:
            chars: set[str] = set()
            for text in _pieces(files, byte, advance):
                chars.update(text)
            tok = CharTokenizer("".join(sorted(chars))) if chars else None
        if tok is None or not size:
            raise CharLMError(f"corpus file is empty: {where}")
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        count, crc = 0, 0
        try:
            with os.fdopen(fd, "wb") as f:
                for piece in _pieces(files, byte, advance):
                    raw = piece if byte else tok.encode(piece).numpy().tobytes()
                    f.write(raw)
                    crc, count = zlib.crc32(raw, crc), count + len(piece)
            os.replace(tmp, folder / "ids.bin")
        finally:
            Path(tmp).unlink(missing_ok=True)
    meta = {"format": FORMAT, "sources": [str(p.resolve()) for p in files], "vocab": tok.vocab,
            "count": count, "dtype": str(tok.dtype).removeprefix("torch."), "crc32": crc}  # fmt: skip
    part = folder / "meta.json.part"
    part.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(part, folder / "meta.json")  # written last: a meta.json means whole ids
    record_check(folder / "checked.json", folder / "ids.bin", str(crc))  # its CRC was taken as it was written
    _drop_older(folder, meta)
    return meta


def _drop_older(folder: Path, meta: dict) -> None:
    """Remove the caches of earlier versions of the same files (same paths and unit), so editing a large
    corpus does not leave a copy behind each time. A process still mapping one keeps reading it: the file
    lives on until it is unmapped."""
    for other in folder.parent.glob("*/meta.json"):
        if other.parent == folder:
            continue
        try:
            old = json.loads(other.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if old.get("sources") == meta["sources"] and (old.get("vocab") == BYTE_VOCAB) == (
            meta["vocab"] == BYTE_VOCAB
        ):
            shutil.rmtree(other.parent, ignore_errors=True)


def remap(ids: torch.Tensor, vocab: str, to_vocab: str) -> torch.Tensor:
    """`ids` of `vocab` as ids of `to_vocab` (a checkpoint's, which may hold more characters), in memory."""
    missing = sorted(set(vocab) - set(to_vocab))
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        shown = ", ".join(map(repr, missing[:10]))
        raise CharLMError(f"characters not in the model's vocabulary: {shown}{more}")
    tok = CharTokenizer(to_vocab)
    table, out = tok.encode(vocab), torch.empty(len(ids), dtype=tok.dtype)
    for start in range(0, len(ids), CHUNK):  # in pieces: ids as int64 would need 8x the corpus
        out[start : start + CHUNK] = table[ids[start : start + CHUNK].long()]
    return out
