"""--data.unit byte: any file is a corpus, one token per byte; text is decoded from UTF-8 with replacement."""

import hashlib
import json
import random
import re
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_charlm import corpus
from lightning_charlm.data import CharDataModule
from lightning_charlm.errors import CharLMError
from lightning_charlm.tokenizer import BYTE_VOCAB, ByteTokenizer, tokenizer_for
from tests.conftest import charlm_main, make_corpus
from tests.test_cli import TINY
from tests.test_readme import SMALL_GPT

CONFIG = Path(__file__).parents[1] / "configs/enwik8.yaml"


def latin1_corpus(folder):
    """A corpus that is not UTF-8 (latin-1 é, ü): `char` refuses it, `byte` reads it."""
    text = make_corpus(folder).read_text(encoding="utf-8").replace("queen", "quéen").replace("lord", "lürd")
    path = folder / "latin1.txt"
    path.write_bytes(text.encode("latin-1"))
    return path


def test_bytes_of_any_file_are_the_tokens(tmp_path):
    path = latin1_corpus(tmp_path)
    dm = CharDataModule(path=str(path), unit="byte")
    train, val = dm.splits
    assert dm.vocab == BYTE_VOCAB and train.dtype == torch.uint8
    assert bytes(torch.cat([train, val]).tolist()) == path.read_bytes()


def test_random_bytes_round_trip(tmp_path):
    raw = random.Random(0).randbytes(20_000)  # mostly invalid UTF-8
    assert b"\xff" in raw and raw.decode("utf-8", errors="ignore") != raw.decode("latin-1")
    path = tmp_path / "random.bin"
    path.write_bytes(raw)
    dm = CharDataModule(path=str(path), unit="byte", split=[0.9, 0.05, 0.05])
    ids = torch.cat([*dm.splits, dm.test_split])
    assert bytes(ids.tolist()) == raw and tokenizer_for(dm.vocab).decode(ids) == raw.decode(
        "utf-8", "replace"
    )


def test_the_byte_tokenizer_round_trips_and_streams_whole_characters():
    tok = tokenizer_for(BYTE_VOCAB)
    assert isinstance(tok, ByteTokenizer) and len(tok) == 256 and tok.start_id == 10
    text = "Ünïcödé 世界 🙂\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    decode = tok.stream_decoder()
    pieces = [decode(ids[i : i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == text and "" in pieces  # a character appears when its last byte has come
    assert (
        tok.decode([0xE4, 0xB8]) == "\ufffd"
        and decode(torch.tensor([0xE4])) == ""
        and decode(None) == "\ufffd"
    )


def test_fit_validate_and_predict_at_byte_level(tmp_path):
    path = latin1_corpus(tmp_path)
    quick = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10", "--sample.every_n_steps", "0"]
    fit = charlm_main("fit", *TINY, "--data.path", str(path), "--data.unit", "byte", *quick, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    best = str(tmp_path / "logs/charlm/version_0/checkpoints/best.ckpt")
    # The checkpoint's unit is used: as characters this file is not even UTF-8.
    val = charlm_main("validate", "--ckpt_path", best, cwd=tmp_path)
    assert val.returncode == 0 and "val/loss" in val.stdout, val.stderr
    pred = charlm_main(
        "predict", "--ckpt_path", best, "--data.prompts", '["Qüeen"]', "--generate.max_new_tokens", "30",
        "--generate.seed", "1", cwd=tmp_path,
    )  # fmt: skip
    assert pred.returncode == 0 and "Qüeen" in pred.stdout, pred.stderr
    wrong = charlm_main("validate", "--ckpt_path", best, "--data.unit", "char", cwd=tmp_path)
    assert wrong.returncode == 2 and "the model reads bytes, not characters" in wrong.stderr


def test_enwik8_is_found_by_name_downloaded_unzipped_and_checked(tmp_path, monkeypatch):
    """The download path, against a local zip (tests never download): the member is unzipped, checked
    against its SHA-1 and kept in the cache; a wrong digest is one clear error and leaves nothing behind."""
    body = bytes(range(256)) * 400  # stands in for the 100 MB file
    zipped = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("enwik8", body)
    monkeypatch.setattr(corpus, "ENWIK8_URL", zipped.as_uri())
    monkeypatch.setattr(corpus, "ENWIK8_SHA1", hashlib.sha1(body).hexdigest())
    monkeypatch.delenv("CHARLM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # no file named enwik8 here: the name is looked up
    dm = CharDataModule(path="enwik8", unit="byte", split=[0.9, 0.05, 0.05])
    assert bytes(torch.cat([*dm.splits, dm.test_split]).tolist()) == body
    cached = tmp_path / "cache/lightning_charlm/enwik8"
    assert cached.read_bytes() == body
    cached.unlink()
    monkeypatch.setattr(corpus, "ENWIK8_SHA1", "0" * 40)
    with pytest.raises(CharLMError, match="downloaded enwik8 has sha1 [0-9a-f]{40}, expected 0{40}"):
        _ = CharDataModule(path="enwik8", unit="byte").splits
    assert list(cached.parent.iterdir()) == []


def test_a_corpus_found_by_name_is_the_published_one(tmp_path, monkeypatch):
    """An enwik8 in $CHARLM_DATA_DIR is checked against the published digest, once per version of the file;
    another file of that name is one clear error that says how to train on it anyway."""
    body = bytes(range(256)) * 40
    data = tmp_path / "data"
    data.mkdir()
    (data / "enwik8").write_bytes(body)
    monkeypatch.setattr(corpus, "ENWIK8_SHA1", hashlib.sha1(body).hexdigest())
    monkeypatch.setenv("CHARLM_DATA_DIR", str(data))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert corpus.corpus_path("enwik8") == data / "enwik8"
    record = tmp_path / "cache/lightning_charlm/checked.json"
    assert str(data / "enwik8") in json.loads(record.read_text())  # not hashed again while unchanged
    time.sleep(0.05)  # past the kernel's timestamp tick (a few ms before Linux 6.13): a new mtime
    (data / "enwik8").write_bytes(body[::-1])  # same size, other bytes
    with pytest.raises(CharLMError, match=r"enwik8 is not the published enwik8: its sha1 is [0-9a-f]{40}, "):
        corpus.corpus_path("enwik8")
    with pytest.raises(CharLMError, match=r"train on it as your own file: --data.path .*enwik8"):
        corpus.corpus_path("enwik8")


def test_the_enwik8_config_trains_and_tests_on_a_stand_in(tmp_path):
    """configs/enwik8.yaml as it is (bytes, three parts), shrunk to run a few steps on a generated file."""
    stand_in = tmp_path / "enwik8-like.xml"
    page = "<page><title>Ünïcödé</title><text>" + "the king shall speak. " * 20 + "</text></page>\n"
    stand_in.write_bytes(page.encode() * 60)
    small = [*SMALL_GPT, "--data.path", str(stand_in), "--sample.every_n_steps", "0"]
    steps = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu"]
    fit = charlm_main("fit", "-c", str(CONFIG), *small, *steps, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    best = tmp_path / "logs/enwik8/version_0/checkpoints/best.ckpt"
    res = charlm_main("test", "--ckpt_path", str(best), "--trainer.accelerator", "cpu", cwd=tmp_path)
    assert res.returncode == 0 and re.search(r"test/bpc\W+\d\.\d+", res.stdout), res.stderr


def test_control_characters_are_shown_not_obeyed_on_a_terminal():
    """A model (a byte model especially) can generate ESC sequences and bells: on a terminal they are shown
    as U+FFFD; files and pipes get the text as generated (writer.PredictionWriter)."""
    from lightning_charlm.writer import terminal_safe

    assert terminal_safe("a\x1b[31mb\x07\r\n\tc\x9bé世") == "a\ufffd[31mb\ufffd\ufffd\n\tc\ufffdé世"
