import pytest
import torch

from lightning_charlm.errors import CharLMError
from lightning_charlm.tokenizer import CharTokenizer


def test_round_trip_any_script():
    text = "Hello, wörld! 你好 🙂\nnew line"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert list(tok.vocab) == sorted(set(text))
    assert ids.dtype == torch.uint8


def test_encode_is_chunked_consistently():
    text = "abcab" * 1000
    tok = CharTokenizer.from_text(text)
    assert torch.equal(tok.encode(text, chunk=7), tok.encode(text))


def test_unknown_characters_are_named_with_positions():
    tok = CharTokenizer(" abc")
    with pytest.raises(CharLMError, match=r"'z' at position 3.*'Q' at position 5"):
        tok.encode("ab z Q")


def test_start_id_is_newline_when_present():
    tok = CharTokenizer("\t\nab")  # a tab sorts before the newline: the newline is id 1
    assert tok.start_id == 1 and tok.decode([tok.start_id]) == "\n"
    assert CharTokenizer("ab").start_id == 0
