"""CharTokenizer: one token per Unicode character; the vocabulary is a plain string kept in checkpoints."""

from __future__ import annotations

import codecs
from collections.abc import Callable

import torch

from lightning_charlm.errors import CharLMError


def _codepoints(text: str) -> torch.Tensor:
    # UTF-32 gives one int32 per character, so encoding is a few vectorized ops, not a Python loop.
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


class CharTokenizer:
    def __init__(self, vocab: str):
        if not vocab:
            raise CharLMError("the vocabulary is empty")
        if list(vocab) != sorted(set(vocab)):
            raise CharLMError("the vocabulary must be sorted unique characters")
        self.vocab = vocab
        self._codes = _codepoints(vocab)  # sorted, so searchsorted maps code point -> id

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def dtype(self) -> torch.dtype:
        """The most compact integer dtype that holds every id (ids of a 100 MB corpus fit in 100-200 MB)."""
        return torch.uint8 if len(self) <= 256 else torch.int16 if len(self) <= 32767 else torch.int32

    def encode(self, text: str, chunk: int = 1 << 22) -> torch.Tensor:
        """Ids of `text` as a 1-D tensor of `self.dtype`; unknown characters are a CharLMError naming them.

        Works in chunks of `chunk` characters so a 100 MB corpus needs tens of MB of scratch, not GBs.
        """
        out = torch.empty(len(text), dtype=self.dtype)
        for start in range(0, len(text), chunk):
            piece = text[start : start + chunk]
            cps = _codepoints(piece)
            ids = torch.searchsorted(self._codes, cps).clamp_(max=len(self) - 1)
            unknown = (self._codes[ids] != cps).nonzero().flatten()
            if len(unknown):
                shown = ", ".join(f"{piece[i]!r} at position {start + i}" for i in unknown[:10].tolist())
                more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
                raise CharLMError(f"characters not in the model's vocabulary: {shown}{more}")
            out[start : start + len(piece)] = ids
        return out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.vocab[i] for i in ids)

    @property
    def start_id(self) -> int:
        """What an empty prompt starts from: a newline when the vocabulary has one."""
        return self.vocab.find("\n") if "\n" in self.vocab else 0

    def stream_decoder(self) -> Callable[[torch.Tensor | None], str]:
        """Text of each next token as it comes (None: the end); a byte tokenizer holds back a partial
        character until its last byte."""
        return lambda ids: "" if ids is None else self.decode(ids)


BYTE_VOCAB = "".join(map(chr, range(256)))  # --data.unit byte: token i is the byte of value i


class ByteTokenizer(CharTokenizer):
    """One token per byte of the text's UTF-8 encoding, so any file is a corpus (--data.unit byte). Its
    vocabulary, as kept in checkpoints, is BYTE_VOCAB; decoded text replaces broken UTF-8 sequences."""

    def __init__(self):
        super().__init__(BYTE_VOCAB)

    def encode(self, text: str, chunk: int = 0) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return bytes(ids.tolist() if isinstance(ids, torch.Tensor) else ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> Callable[[torch.Tensor | None], str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: decoder.decode(b"" if ids is None else bytes(ids.tolist()), final=ids is None)


def tokenizer_for(vocab: str) -> CharTokenizer:
    """Bytes when the vocabulary is BYTE_VOCAB (a character corpus holding exactly the 256 code points
    U+0000-U+00FF and no other would read as bytes: no real text does), else characters."""
    return ByteTokenizer() if vocab == BYTE_VOCAB else CharTokenizer(vocab)
