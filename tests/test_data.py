import pytest
import torch

from lightning_charlm.data import IGNORE, CharDataModule, RandomWindows, StridedWindows, on_device
from lightning_charlm.errors import CharLMError
from lightning_charlm.tokenizer import CharTokenizer
from tests.conftest import needs_shakespeare


@needs_shakespeare
def test_tiny_shakespeare_split_and_vocabulary():
    dm = CharDataModule(block_size=8)
    train, val = dm.splits
    assert len(dm.vocab) == 65
    assert (len(train), len(val)) == (1_003_854, 111_540)


def test_split_is_contiguous(corpus):
    dm = CharDataModule(path=str(corpus), block_size=8)
    train, val = dm.splits
    text = corpus.read_text()
    tok = CharTokenizer(dm.vocab)
    assert tok.decode(train) + tok.decode(val) == text
    assert len(train) == int(0.9 * len(text))


def test_train_windows_shift_and_reproducible():
    data = torch.arange(1000) % 97
    a = iter(RandomWindows(data, block_size=16, batch_size=8, seed=3))
    b = iter(RandomWindows(data, block_size=16, batch_size=8, seed=3))
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.shape == (8, 16)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # y is x shifted by one
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = iter(RandomWindows(data, block_size=16, batch_size=8, seed=4))
    assert not torch.equal(next(c)[0], next(iter(RandomWindows(data, 16, 8, seed=3)))[0])


def test_train_windows_are_slices_of_a_mapped_split(tmp_path):
    # The path a GPU run takes for a split left on the host: one gather into a buffer (pinned on CUDA), then
    # a copy; the windows are the plain slices at the offsets the seed draws.
    ids = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    (tmp_path / "ids.bin").write_bytes(ids.numpy().tobytes())
    mapped = torch.from_file(str(tmp_path / "ids.bin"), size=5000, dtype=torch.uint8)
    x, y = next(iter(RandomWindows(mapped, block_size=32, batch_size=6, seed=5, device="cpu")))
    starts = torch.randint(5000 - 32, (6, 1), generator=torch.Generator().manual_seed(5)).flatten()
    assert torch.equal(x, torch.stack([ids[i : i + 32] for i in starts]).long())
    assert torch.equal(y, torch.stack([ids[i + 1 : i + 33] for i in starts]).long())


def test_where_the_training_split_lives():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert on_device(10**12, cpu, wanted=False)  # the host is the CPU's device: nothing to copy
    assert on_device(10**12, cuda, wanted=True) and not on_device(1, cuda, wanted=False)
    assert on_device(10**12, mps)  # shares the host's memory
    # CUDA by default: a quarter of the free memory at most (the device's free bytes, given here)
    assert on_device(250, cuda, free=lambda device: 1000) and not on_device(
        251, cuda, free=lambda device: 1000
    )
    host = torch.zeros(100, dtype=torch.uint8)
    assert RandomWindows(host, 8, 2, seed=0, device=cuda).pinned  # a mapped split for a GPU: pinned gather
    assert not RandomWindows(host, 8, 2, seed=0).pinned


def test_train_windows_state_redraws_the_newest_batch():
    # Lightning checkpoints while it already holds the next batch (prefetched), so the saved state must
    # draw that batch again rather than the one after it.
    data = torch.arange(500)
    ds = RandomWindows(data, block_size=8, batch_size=4, seed=0)
    it = iter(ds)
    next(it)
    prefetched = next(it)[0]
    state = ds.state_dict()
    fresh = RandomWindows(data, block_size=8, batch_size=4, seed=0)
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh))[0], prefetched)
    other_rank = RandomWindows(data, block_size=8, batch_size=4, seed=1)
    other_rank.load_state_dict(state)
    assert not torch.equal(next(iter(other_rank))[0], prefetched)  # each rank continues its own stream


def windows(data, block, stride) -> tuple[torch.Tensor, torch.Tensor]:
    ds = StridedWindows(data, block, stride)
    return tuple(torch.stack(t) for t in zip(*(ds[i] for i in range(len(ds))), strict=True))


def test_val_windows_cover_every_target_exactly_once():
    data = torch.arange(1, 1001)  # value = position + 1, so targets identify themselves
    for block, stride in [(16, 16), (16, 5), (7, 7), (999, 999)]:
        x, y = windows(data, block, stride)
        scored = y[y != IGNORE]
        assert sorted(scored.tolist()) == list(range(2, 1001)), (block, stride)
        kept = y[:, :-1] != IGNORE
        assert torch.equal(x[:, 1:][kept], y[:, :-1][kept])  # y is x shifted by one
        x2, y2 = windows(data, block, stride)
        assert torch.equal(x, x2) and torch.equal(y, y2)  # fixed: identical on every run


def test_a_test_split_is_cut_after_validation_and_the_default_is_unchanged(corpus):
    n = len(corpus.read_text(encoding="utf-8"))
    train, val = CharDataModule(path=str(corpus)).splits
    assert (len(train), len(val)) == (int(0.9 * n), n - int(0.9 * n))  # as before --data.split existed
    dm = CharDataModule(path=str(corpus), split=[0.8, 0.1, 0.1])
    train3, val3 = dm.splits
    assert (len(train3), len(val3), len(dm.test_split)) == (
        int(0.8 * n),
        int(0.1 * n),
        n - len(train3) - len(val3),
    )
    assert torch.equal(
        torch.cat([train3, val3, dm.test_split]), torch.cat([train, val])
    )  # contiguous, in order
    assert len(CharDataModule(path=str(corpus)).test_split) == 0
    for bad in ([0.9, 0.2], [1.0], [0.5, 0.25, 0.125, 0.125], [1.1, -0.05, -0.05]):
        with pytest.raises(CharLMError, match="data.split must be 2 or 3 positive fractions"):
            CharDataModule(path=str(corpus), split=bad)
