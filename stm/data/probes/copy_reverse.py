"""Copy and reverse: a random sequence, then a marker; the target is the sequence (reversed)."""

from __future__ import annotations

from stm.data.fieldmap import Record
from stm.data.probes.seeding import _draw, sample_rng


def copy_sequence(n_samples: int, seed: int = 0, split: str | None = "train", length=256,
         alphabet: str = "abcdefghijklmnopqrstuvwxyz", marker: str = "|", reverse: bool = False) -> list[Record]:
    """Copy (or reverse): a random sequence of `length` symbols from `alphabet` (an int or an inclusive
    [lo, hi] range), then `marker`; the target is the sequence (reversed when `reverse`)."""
    if not alphabet or marker in alphabet:
        raise ValueError(f"copy: the alphabet must be non-empty and not contain the marker {marker!r}")
    kind = "reverse" if reverse else "copy"
    records = []
    for i in range(n_samples):
        rng = sample_rng(seed, split, i)
        n = _draw(rng, length, "copy.length")
        seq = "".join(alphabet[j] for j in rng.integers(len(alphabet), size=n))
        records.append(Record(
            id=f"{kind}-{split}-{seed}-{i}", context=seq + marker, target=seq[::-1] if reverse else seq,
            origin=f"probe:{kind}:{split}:{seed}#{i}",
            meta={"probe": kind, "fact_chars": [[0, n]], "question_char": n, "distance_chars": n, "length": n,
                  "alphabet_size": len(alphabet), "seed": seed, "split": split, "index": i}))
    return records
