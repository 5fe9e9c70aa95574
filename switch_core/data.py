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
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
RELATIVE_PATH = Path("tinyshakespeare") / "input.txt"
SIZE = 1_115_394  # bytes
# The download: seconds to connect and between two reads, seconds for the whole file, attempts, first back-off.
TIMEOUT_S, DEADLINE_S, ATTEMPTS, BACKOFF_S = 20.0, 300.0, 3, 2.0


def default_root() -> Path:
    """Where the data lives when no root is given: $SWITCH_CORE_DATA, else ~/.cache/switch_core."""
    env = os.environ.get("SWITCH_CORE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "switch_core"


def sha256_of(path: str | os.PathLike, limit: int | None = None) -> str:
    """Hex sha256 of a file's bytes; with `limit`, of at most its first limit bytes (so a link to an endless
    device such as /dev/zero cannot hang the check)."""
    digest, left = hashlib.sha256(), limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            digest.update(block)
            left = None if left is None else left - len(block)
    return digest.hexdigest()


def _checksum_error(path: Path, actual: str) -> RuntimeError:
    return RuntimeError(
        f"checksum mismatch for existing file {path}: sha256 is {actual}, expected {SHA256}. "
        f"The file was left untouched. Delete it to download a fresh copy, or point "
        f"SWITCH_CORE_DATA (or root=) at a directory holding a good tinyshakespeare/input.txt."
    )


def _fetch(url: str, dst: str) -> None:
    """Copy url to the file dst: TIMEOUT_S to connect and between reads, DEADLINE_S in all (a proxy or server
    that accepts and never answers, or trickles, cannot hang the run). Honours http(s)_proxy."""
    start = time.monotonic()
    opener = urllib.request.build_opener()  # reads the proxy settings now, not when first imported
    with opener.open(url, timeout=TIMEOUT_S) as response, open(dst, "wb") as f:
        while block := response.read(1 << 16):
            f.write(block)
            if f.tell() > 2 * SIZE:
                raise OSError(f"the server sent more than {2 * SIZE:,} bytes")
            if time.monotonic() - start > DEADLINE_S:
                raise TimeoutError(f"the download took longer than {DEADLINE_S:.0f} s")


def _download(path: Path) -> None:
    """Download URL to a temporary file beside `path`, verify it, then move it into place. ATTEMPTS tries with
    a doubling back-off, each bounded in time (`_fetch`).

    NOTE: the rename (os.replace) is atomic, so `path` is either absent or verified;
    a failed or corrupt download leaves nothing behind (nor do earlier interrupted ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(".input.txt.*.part"):  # left by a download that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".input.txt.", suffix=".part")
    os.close(fd)
    try:
        for attempt in range(ATTEMPTS):
            try:
                _fetch(URL, tmp)  # looked up at call time so tests can stand a local file in for the network
                break
            except Exception as e:  # noqa: BLE001 - URLError, timeouts, resets, HTTP errors
                if attempt + 1 < ATTEMPTS:
                    time.sleep(BACKOFF_S * 2 ** attempt)
                    continue
                raise RuntimeError(
                    f"could not download Tiny Shakespeare from {URL} after {ATTEMPTS} attempts ({e}). Check the "
                    f"network (and any https_proxy), or place the file by hand: download {URL} with a browser or "
                    f"curl and save it as {path} (or set SWITCH_CORE_DATA to a directory holding "
                    f"tinyshakespeare/input.txt).") from e
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
    actual = sha256_of(path, limit=SIZE + 1)  # a longer file is wrong anyway
    if actual != SHA256:
        raise _checksum_error(path, actual)
    with open(path, encoding="utf-8") as f:
        return f.read(SIZE + 1)


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
