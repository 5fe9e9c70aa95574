"""Fine-tuning data in miniature (paper §4.1): one speaker's lines of Tiny Shakespeare, held out of pre-training.

A data slice (``TrainConfig.data_slice``, CLI ``--data-slice``) names part of the text:

  ``speaker:NAME``   only NAME's speeches (the fine-tuning set)
  ``without:NAME``   every speech but NAME's (pre-training that never saw them)

NAME may be ``#k``: the speaker with the k-th most characters of speech (``#1`` is GLOUCESTER), so that the
held-out speaker is chosen by code, not by hand. A speech is a blank-line separated paragraph whose first line is
``NAME:``. The tokenizer is always the whole text's (the same 65 symbols, so a model moves between slices), and
the slice is split 90/10 into train/validation like the whole text.
"""
from __future__ import annotations

import os
from collections import Counter

from .data import CharData, CharTokenizer, load_tiny_shakespeare, split

KINDS = ("speaker", "without")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, paragraph) for every blank-line separated paragraph; speaker "" when it names none."""
    out = []
    for para in text.split("\n\n"):
        first = para.partition("\n")[0]
        out.append((first[:-1] if first.endswith(":") else "", para))
    return out


def speakers_by_size(text: str) -> list[str]:
    """Speakers, most characters of speech first (ties: alphabetical)."""
    sizes = Counter()
    for who, para in speeches(text):
        if who:
            sizes[who] += len(para)
    return sorted(sizes, key=lambda w: (-sizes[w], w))


def parse_slice(data_slice: str) -> tuple[str, str]:
    """("speaker" | "without", NAME or "#k"); ValueError naming data_slice when malformed."""
    kind, sep, name = data_slice.partition(":") if isinstance(data_slice, str) else ("", "", "")
    rank_ok = not name.startswith("#") or (name[1:].isdigit() and int(name[1:]) >= 1)
    if not sep or kind not in KINDS or not name or not rank_ok:
        raise ValueError(f"data_slice must be 'speaker:NAME' or 'without:NAME' (NAME may be '#k', the k-th "
                         f"largest speaker), got {data_slice!r}")
    return kind, name


def slice_text(text: str, data_slice: str) -> tuple[str, str]:
    """(the sliced text, the speaker it is about). ValueError for a speaker the text does not have."""
    kind, name = parse_slice(data_slice)
    ranked = speakers_by_size(text)
    if name.startswith("#"):
        k = int(name[1:])
        if k > len(ranked):
            raise ValueError(f"data_slice {data_slice!r}: the text has only {len(ranked)} speakers")
        name = ranked[k - 1]
    elif name not in ranked:
        raise ValueError(f"data_slice {data_slice!r}: no speeches by {name!r} in the text")
    keep = [para for who, para in speeches(text) if (who == name) == (kind == "speaker")]
    return "\n\n".join(keep), name


def load_slice_data(root: str | os.PathLike | None, data_slice: str, val_fraction: float = 0.1) -> CharData:
    """Tiny Shakespeare's slice as CharData: the whole text's tokenizer, the slice split 90/10."""
    text = load_tiny_shakespeare(root)
    tokenizer = CharTokenizer(text)
    sliced, _ = slice_text(text, data_slice)
    train, val = split(tokenizer.encode(sliced), val_fraction)
    return CharData(tokenizer, train, val)
