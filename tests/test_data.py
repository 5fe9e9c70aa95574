"""Tiny Shakespeare loader: download / verify / refuse paths (a local file stands in for the network),
tokenizer, split and random windows."""
from __future__ import annotations

import shutil

import pytest
import torch

from switch_core import data
from switch_core.data import CharTokenizer, get_batch, load_tiny_shakespeare, split

N_CHARS = 1_115_394

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def fake_download(monkeypatch, shakespeare_root):
    """Replace the network download with a copy of `source` (the real file unless a test says otherwise)."""
    calls = []

    def install(source=shakespeare_root / "tinyshakespeare" / "input.txt"):
        def download(url, dst):
            calls.append((url, dst))
            shutil.copyfile(source, dst)

        monkeypatch.setattr(data, "_fetch", download)
        return calls

    return install


def test_loads_the_shared_file(shakespeare_root):
    text = load_tiny_shakespeare(shakespeare_root, download=False)
    assert len(text) == N_CHARS  # ASCII: characters == bytes
    assert CharTokenizer(text).vocab_size == 65


def test_root_defaults_to_env_var(monkeypatch, shakespeare_root):
    monkeypatch.setenv("SWITCH_CORE_DATA", str(shakespeare_root))
    assert data.default_root() == shakespeare_root
    assert len(load_tiny_shakespeare(download=False)) == N_CHARS


def test_root_defaults_to_cache_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SWITCH_CORE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.default_root() == tmp_path / ".cache" / "switch_core"


def test_download_verifies_and_places_file(tmp_path, fake_download):
    calls = fake_download()
    text = load_tiny_shakespeare(tmp_path)
    assert len(text) == N_CHARS and calls[0][0] == data.URL
    assert sorted(p.name for p in (tmp_path / "tinyshakespeare").iterdir()) == ["input.txt"]  # temp file gone
    load_tiny_shakespeare(tmp_path)  # second load reads the file, no second download
    assert len(calls) == 1


def test_corrupt_download_raises_and_places_nothing(tmp_path, fake_download):
    bad = tmp_path / "bad.txt"
    bad.write_text("not shakespeare")
    fake_download(bad)
    root = tmp_path / "root"
    with pytest.raises(RuntimeError, match="checksum"):
        load_tiny_shakespeare(root)
    assert list((root / "tinyshakespeare").iterdir()) == []  # neither input.txt nor the temporary file


def test_failed_download_leaves_no_temp_file(tmp_path, monkeypatch):
    def broken(url, dst):
        open(dst, "w").write("partial")
        raise OSError("network down")

    monkeypatch.setattr(data, "_fetch", broken)
    monkeypatch.setattr(data, "BACKOFF_S", 0.0)
    with pytest.raises(RuntimeError, match="could not download.*network down"):
        load_tiny_shakespeare(tmp_path)
    assert list((tmp_path / "tinyshakespeare").iterdir()) == []


def test_existing_file_with_wrong_checksum_is_refused_not_overwritten(tmp_path, fake_download):
    calls = fake_download()
    path = tmp_path / "tinyshakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text("edited by hand")
    with pytest.raises(RuntimeError, match="checksum") as err:
        load_tiny_shakespeare(tmp_path)
    assert str(path) in str(err.value) and "Delete it" in str(err.value)
    assert path.read_text() == "edited by hand" and calls == []


def test_missing_file_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=False") as err:
        load_tiny_shakespeare(tmp_path, download=False)
    assert str(tmp_path / "tinyshakespeare" / "input.txt") in str(err.value)


def test_tokenizer_roundtrip_and_unknown_character():
    tok = CharTokenizer("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello").tolist() == [3, 2, 4, 4, 5]
    assert tok.decode(tok.encode("world")) == "world"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("z")


def test_split_is_90_10_in_order(char_data):
    assert len(char_data.train) == int(N_CHARS * 0.9) and len(char_data.train) + len(char_data.val) == N_CHARS
    train, val = split(torch.arange(10))
    assert train.tolist() == list(range(9)) and val.tolist() == [9]
    with pytest.raises(ValueError, match="val_fraction"):
        split(torch.arange(10), 1.0)


def test_get_batch_targets_are_inputs_shifted_by_one():
    ids = torch.arange(100)
    x, y = get_batch(ids, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    torch.testing.assert_close(y, x + 1)  # ids are their own positions, so a window is consecutive numbers
    assert (x[:, 1:] == x[:, :-1] + 1).all()


def test_get_batch_is_driven_by_the_generator_only():
    ids = torch.arange(1000)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    a = get_batch(ids, 3, 5, g1)[0]
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(a, get_batch(ids, 3, 5, g2)[0])
    assert not torch.equal(get_batch(ids, 3, 5, g1)[0], a)  # the generator advanced


def test_get_batch_shortest_split_has_one_window():
    x, y = get_batch(torch.arange(9), 2, 8, torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(8))] * 2 and y[0, -1] == 8
    with pytest.raises(ValueError, match="seq_len"):
        get_batch(torch.arange(8), 2, 8, torch.Generator())
