"""Exact and near-duplicate removal: normalised-text hashes, then MinHash with LSH banding.

Why our own ~100 lines and not a library: the maintained MinHash/LSH libraries are
`datasketch` (pure Python + numpy + scipy; neither it nor scipy is in our environment) and
NeMo Curator (GPU, Dask/Ray: a cluster framework for one step of a 100k-row job). This file
needs numpy alone, and every candidate pair LSH proposes is checked with the exact Jaccard
similarity of its shingle sets, so the only approximation is a pair LSH never proposes.

* exact: lower-cased, whitespace-collapsed text; the first of equal texts is kept;
* near: shingles are runs of `shingle_words` words (\\w+, lower-cased); a text's MinHash is,
  for each of num_bands * rows_per_band hash functions h(x) = (a*x + b) mod 2^64 (odd a, top
  32 bits kept), the minimum over its shingles. Texts sharing all rows of any band are
  candidates. A pair with Jaccard s becomes a candidate with probability
  1 - (1 - s^r)^b: with the defaults (b = 20, r = 6) 0.998 at s = 0.8 and 0.27 at s = 0.5
  (the latter then fail the exact check).
* greedy in index order: a text is removed when it is a near-duplicate of a text already
  kept, so every removal names the kept text it duplicates, and no chain of small steps
  removes a text unlike every kept one (as connected components would).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

_WORD = re.compile(r"\w+")
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def _word_hash(word: str, cache: dict) -> int:
    value = cache.get(word)
    if value is None:
        value = cache[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return value


def shingles(text: str, k: int, cache: dict) -> np.ndarray:
    """64-bit hashes of the text's k-word shingles (one shingle of all words when shorter)."""
    words = np.array([_word_hash(w, cache) for w in _WORD.findall(text.lower())], dtype=np.uint64)
    if len(words) == 0:
        return words
    k = min(k, len(words))
    mixed = np.zeros(len(words) - k + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(k):  # polynomial combination of the k word hashes, mod 2^64
            mixed = mixed * np.uint64(0x100000001B3) + words[offset:offset + len(mixed)]
    return np.unique(mixed)


class MinHasher:
    def __init__(self, num_perm: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, shingle_hashes: np.ndarray) -> np.ndarray:
        if len(shingle_hashes) == 0:
            return np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            values = (self.a[:, None] * shingle_hashes[None, :] + self.b[:, None]) >> np.uint64(32)
        return values.min(axis=1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def deduplicate(texts: list[str], cfg) -> dict[int, tuple[str, int]]:
    """{position: (kind, position of the kept text it duplicates)} of the texts to remove; kind is exact or near."""
    removed: dict[int, tuple[str, int]] = {}
    first_of: dict[str, int] = {}
    for position, text in enumerate(texts):
        key = hashlib.sha1(normalized(text).encode()).hexdigest()
        if key in first_of:
            removed[position] = ("exact", first_of[key])
        else:
            first_of[key] = position
    hasher = MinHasher(cfg.num_bands * cfg.rows_per_band)
    cache: dict = {}
    buckets: dict[tuple, list[int]] = defaultdict(list)
    kept_shingles: dict[int, np.ndarray] = {}
    rows = cfg.rows_per_band
    for position, text in enumerate(texts):
        if position in removed:
            continue
        grams = shingles(text, cfg.shingle_words, cache)
        signature = hasher.signature(grams)
        keys = [(band, signature[band * rows:(band + 1) * rows].tobytes()) for band in range(cfg.num_bands)]
        candidates = sorted({other for key in keys for other in buckets.get(key, ())})
        duplicate_of = next((other for other in candidates
                             if jaccard(grams, kept_shingles[other]) >= cfg.near_duplicate_jaccard), None)
        if duplicate_of is not None:
            removed[position] = ("near", duplicate_of)
            continue
        kept_shingles[position] = grams
        for key in keys:
            buckets[key].append(position)
    return removed
