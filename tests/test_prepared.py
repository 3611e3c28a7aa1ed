"""Large corpora are prepared once into a token file in the cache and memory-mapped after that (prepared.py).
The tests lower the size threshold and the read size, so small generated files take every path."""

import json
import logging
import os
import time

import pytest
import torch

from lightning_charlm import prepared
from lightning_charlm.data import CharDataModule
from lightning_charlm.errors import CharLMError
from tests.conftest import run_charlm
from tests.test_cli import TINY, scalars

TEXT = "".join(f"line {i}: ünïcödé 世界 🙂 the king shall speak\n" for i in range(400))  # 1-4 byte characters


@pytest.fixture
def big(tmp_path, monkeypatch):
    """Every corpus counts as large; 1,000-byte reads, so characters straddle the cuts; a private cache."""
    monkeypatch.setattr("lightning_charlm.data.PREPARE_MIN_BYTES", 0)
    monkeypatch.setattr(prepared, "CHUNK", 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def splits(path, **kwargs):
    dm = CharDataModule(path=str(path), block_size=16, **kwargs)
    return dm.vocab, torch.cat(dm.splits)


def prepared_files(tmp_path):
    return list((tmp_path / "cache/lightning_charlm/tokens").glob("*/ids.bin"))


def test_a_large_corpus_is_prepared_once_then_memory_mapped(big, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_charlm"):
        vocab, ids = splits(big)
    assert "preparing" in caplog.text
    (ids_file,) = prepared_files(tmp_path)
    meta = json.loads((ids_file.parent / "meta.json").read_text())
    assert meta["vocab"] == vocab and meta["dtype"] == "uint8" and meta["count"] == len(TEXT)
    monkeypatch.setattr("lightning_charlm.data.PREPARE_MIN_BYTES", 10**12)  # read in memory, as small files
    in_memory_vocab, in_memory = splits(big)
    assert in_memory_vocab == vocab and torch.equal(in_memory, ids)
    assert "".join(vocab[i] for i in ids.tolist()) == TEXT
    monkeypatch.setattr("lightning_charlm.data.PREPARE_MIN_BYTES", 0)
    caplog.clear()
    mtime = ids_file.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="lightning_charlm"):
        again = CharDataModule(path=str(big), block_size=16)
        train, _ = again.splits
    assert "preparing" not in caplog.text and ids_file.stat().st_mtime_ns == mtime  # mapped, not rebuilt
    # The split is read from the file's mapping (/proc/self/maps), not from a copy in memory.
    maps = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith(str(ids_file))]
    spans = [tuple(int(a, 16) for a in m.split("-")) for m in maps]
    assert any(lo <= train.data_ptr() < hi for lo, hi in spans), (maps, hex(train.data_ptr()))


def test_an_edited_corpus_is_prepared_again(big, tmp_path):
    _, before = splits(big)
    st = big.stat()
    edited = TEXT.replace("king", "kong", 1)  # same size, other bytes, and the old modification time
    big.write_text(edited, encoding="utf-8")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    (old,) = prepared_files(tmp_path)
    vocab, after = splits(big)
    assert "".join(vocab[i] for i in after.tolist()) == edited
    (new,) = prepared_files(tmp_path)  # the earlier version's cache is gone: edits leave no copies behind
    assert new != old and not old.exists()


DAMAGES = [
    "truncated",
    "one byte changed",
    "one byte changed, times put back",
    "meta.json garbage",
    "ids.bin gone",
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_rebuilt_never_trained_on(big, tmp_path, damage, caplog):
    vocab, ids = splits(big)
    (ids_file,) = prepared_files(tmp_path)
    raw, st = bytearray(ids_file.read_bytes()), ids_file.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick (a few ms before Linux 6.13): a new ctime
    if damage == "truncated":
        ids_file.write_bytes(raw[:-100])
    elif damage.startswith("one byte changed"):
        raw[len(raw) // 2] ^= 1
        ids_file.write_bytes(raw)
        if damage.endswith("put back"):  # the check is skipped only while the kernel's ctime is unchanged
            os.utime(ids_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif damage == "meta.json garbage":
        (ids_file.parent / "meta.json").write_text("{not json")
    else:
        ids_file.unlink()
    with caplog.at_level(logging.WARNING, logger="lightning_charlm"):
        assert torch.equal(splits(big)[1], ids)
    assert "preparing" in caplog.text


def test_an_unchanged_cache_is_checked_once(big, tmp_path):
    splits(big)
    (ids_file,) = prepared_files(tmp_path)
    checked = ids_file.parent / "checked.json"
    st = ids_file.stat()
    crc = str(json.loads((ids_file.parent / "meta.json").read_text())["crc32"])
    stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, crc]
    assert json.loads(checked.read_text()) == {str(ids_file.resolve()): stamp}
    checked.unlink()  # as if never checked: the next launch checks in full and records it
    splits(big)
    stamp = checked.stat().st_mtime_ns
    splits(big)  # unchanged since: not checked again, the record is left as it was
    assert checked.stat().st_mtime_ns == stamp


def test_invalid_utf8_is_reported_at_its_offset_in_the_file(big):
    raw = TEXT.encode()
    offset = 2500  # in the third piece read
    offset += next(i for i in range(8) if raw[offset + i] < 0x80)  # an ASCII byte, replaced whole
    big.write_bytes(raw[:offset] + b"\xff" + raw[offset + 1 :])
    with pytest.raises(CharLMError, match=f"0xff at byte offset {offset} "):
        splits(big)


def test_a_checkpoint_vocabulary_maps_the_prepared_ids(big):
    vocab, ids = splits(big)
    wider = "".join(sorted(set(vocab) | set("XYZ")))
    mapped_vocab, mapped = splits(big, vocab=wider)
    assert mapped_vocab == wider and "".join(wider[i] for i in mapped.tolist()) == TEXT
    with pytest.raises(CharLMError, match="not in the model's vocabulary: '世'"):
        splits(big, vocab=vocab.replace("世", ""))


def test_charlm_fit_and_validate_on_a_prepared_corpus(big, tmp_path):
    env = {"CHARLM_PREPARE_MIN_BYTES": "0", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["--data.path", str(big), "--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
    res = run_charlm("fit", *TINY, *args, "--sample.every_n_steps", "0", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "preparing" in res.stderr and len(prepared_files(tmp_path)) == 1
    val = [e.value for e in scalars(tmp_path / "logs/charlm/version_0").Scalars("val/loss")]
    assert len(val) == 2 and val[1] < val[0]


def test_a_folder_or_a_pattern_is_a_corpus_of_its_files_in_sorted_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    books = tmp_path / "books"
    (books / "sub").mkdir(parents=True)
    for name, text in {
        "b.txt": "second\n",
        "a.txt": "first",
        "sub/c.md": "thïrd\n",
        ".notes": "hidden",
    }.items():
        (books / name).write_text(text, encoding="utf-8")

    def corpus(path, **kwargs):
        dm = CharDataModule(path=str(path), block_size=2, **kwargs)
        return dm.vocab, torch.cat(dm.splits)

    vocab, ids = corpus(books)  # every file at any depth, hidden ones left out, joined by a newline
    assert "".join(vocab[i] for i in ids.tolist()) == "first\nsecond\n\nthïrd\n"
    vocab, ids = corpus(books / "*.txt")
    assert "".join(vocab[i] for i in ids.tolist()) == "first\nsecond\n"
    _, raw = corpus(books / "**" / "*.md", unit="byte")  # one file: mapped as it is
    assert bytes(raw.tolist()) == "thïrd\n".encode()
    _, raw = corpus(books, unit="byte")  # several: their bytes prepared into one file
    assert bytes(raw.tolist()) == "first\nsecond\n\nthïrd\n".encode()
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "empty", "holds no files"), (books / "*.csv", "no file matches")):
        with pytest.raises(CharLMError, match=message):
            corpus(path)


def test_preparing_shows_a_bar_on_a_terminal(big, tmp_path, monkeypatch):
    """With stderr on a terminal (a pseudo-terminal here), the preparation draws its progress; elsewhere only
    the one 'preparing' line is logged."""
    import pty
    import re
    import sys
    import threading

    main, terminal = pty.openpty()
    chunks = []

    def drain():  # read while it draws: rich writes in several chunks, and a full pty would block the writer
        while True:
            try:
                chunk = os.read(main, 1 << 16)
            except OSError:  # EIO: the terminal side is closed and everything drawn has been read
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(terminal, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        splits(big)  # 400 reads of 1,000 bytes in two passes
        tty.flush()
    reader.join(10)  # nothing more drawn: fail, not wait forever
    os.close(main)
    shown = b"".join(chunks).decode()
    assert "preparing" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown) and "100%" in shown
