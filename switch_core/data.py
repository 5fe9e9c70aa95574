"""Tiny Shakespeare, a character tokenizer and random training windows.

Shape legend: N = tokens in a split, B = batch size, T = sequence length.

The text (1,115,394 characters of Shakespeare, 65 distinct symbols) is the char-rnn
data set used by nanoGPT. It is downloaded once, checked against a pinned sha256 and
never overwritten: a file with the wrong checksum is reported, not replaced.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
RELATIVE_PATH = Path("tinyshakespeare") / "input.txt"


def default_root() -> Path:
    """Where the data lives when no root is given: $SWITCH_CORE_DATA, else ~/.cache/switch_core."""
    env = os.environ.get("SWITCH_CORE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "switch_core"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum_error(path: Path, actual: str) -> RuntimeError:
    return RuntimeError(
        f"checksum mismatch for existing file {path}: sha256 is {actual}, expected {SHA256}. "
        f"The file was left untouched. Delete it to download a fresh copy, or point "
        f"SWITCH_CORE_DATA (or root=) at a directory holding a good tinyshakespeare/input.txt."
    )


def _download(path: Path) -> None:
    """Download URL to a temporary file beside `path`, verify it, then move it into place.

    NOTE: the rename (os.replace) is atomic, so `path` is either absent or verified;
    a failed or corrupt download leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".input.txt.", suffix=".part")
    os.close(fd)
    try:
        # Looked up at call time so tests can stand a local file in for the network.
        try:
            torch.hub.download_url_to_file(URL, tmp, progress=False)
        except Exception as e:
            raise RuntimeError(f"could not download Tiny Shakespeare from {URL} ({e}). Check the network, or "
                               f"place the file at {path} by hand (or set SWITCH_CORE_DATA).") from e
        actual = sha256_of(tmp)
        if actual != SHA256:
            raise RuntimeError(
                f"checksum mismatch for the file downloaded from {URL}: sha256 is {actual}, "
                f"expected {SHA256}. Nothing was written to {path}; try again later, or place "
                f"a good copy there by hand.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tiny_shakespeare(root: str | os.PathLike | None = None, download: bool = True) -> str:
    """Return the Tiny Shakespeare text, reading root/tinyshakespeare/input.txt.

    root defaults to $SWITCH_CORE_DATA, else ~/.cache/switch_core. A missing file is
    downloaded when `download` is true; the file's sha256 is checked on every load and a
    mismatching file is never overwritten."""
    path = Path(root if root is not None else default_root()).expanduser() / RELATIVE_PATH
    if not path.exists():
        if not download:
            raise FileNotFoundError(
                f"Tiny Shakespeare not found at {path} and download=False. Pass download=True, "
                f"or set SWITCH_CORE_DATA (or root=) to a directory holding tinyshakespeare/input.txt."
            )
        _download(path)
    actual = sha256_of(path)
    if actual != SHA256:
        raise _checksum_error(path, actual)
    return path.read_text(encoding="utf-8")


class CharTokenizer:
    """One token per distinct character, ids in sorted character order (65 for Tiny Shakespeare)."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """str of length N -> ids [N] long. Unknown characters raise ValueError."""
        try:
            return torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Tensor | list[int]) -> str:
        """ids [N] -> str of length N."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i] for i in ids)


@dataclass
class CharData:
    """Tokenized text split into train and validation ids (ids [N] long each)."""

    tokenizer: CharTokenizer
    train: Tensor
    val: Tensor


def split(ids_N: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """First (1 - val_fraction) of the ids for training, the rest for validation (no shuffling)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_train = int(len(ids_N) * (1.0 - val_fraction))
    return ids_N[:n_train], ids_N[n_train:]


def load_char_data(root: str | os.PathLike | None = None, download: bool = True,
                   val_fraction: float = 0.1) -> CharData:
    """Tiny Shakespeare, tokenized by character and split 90/10 into train/validation."""
    text = load_tiny_shakespeare(root, download=download)
    tokenizer = CharTokenizer(text)
    train, val = split(tokenizer.encode(text), val_fraction)
    return CharData(tokenizer, train, val)


def get_batch(ids_N: Tensor, batch_size: int, seq_len: int, generator: torch.Generator,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """B random windows of T+1 consecutive ids: inputs x [B, T] and next-token targets y [B, T].

    The start positions come from `generator` alone, so a saved generator state replays the
    same batches (exact resume)."""
    if len(ids_N) < seq_len + 1:
        raise ValueError(f"seq_len {seq_len} needs at least {seq_len + 1} tokens, split has {len(ids_N)}")
    start_B = torch.randint(len(ids_N) - seq_len, (batch_size,), generator=generator)
    window_BT1 = ids_N[start_B[:, None] + torch.arange(seq_len + 1)]
    x_BT, y_BT = window_BT1[:, :-1], window_BT1[:, 1:]
    return x_BT.to(device), y_BT.to(device)
