"""Random numbers the project owns: SHA-256 in counter mode, the same on every NumPy version and machine.

NumPy promises a `Generator`'s stream only "on the same build of numpy, in the same environment, on
the same machine" and may change a method's algorithm in any feature release (its compatibility
policy, NEP 19); only the legacy `RandomState` is frozen. Tasks and class splits must stay what they
were when results were published, so they are drawn here from SHA-256, whose output is fixed by its
standard, with integer arithmetic only (no floating point in the choice of anything).
"""

from __future__ import annotations

import hashlib

import numpy as np

_WORDS_PER_BLOCK = 4  # one SHA-256 digest is four 64-bit words


Key = str | int


def _digest(*key: Key) -> bytes:
    return hashlib.sha256(":".join(map(str, key)).encode()).digest()


class Stream:
    """An endless stream of uniform 64-bit words, a pure function of its key.

    The key starts with a name of its use ("task", "iteration"), so two uses never share words.
    Word `i` comes from SHA-256 of "key:...:i // 4" (little-endian), so a prefix of the stream does
    not depend on how many words are asked for at a time.
    """

    def __init__(self, *key: Key):
        self.key, self.used = key, 0
        self._prefix = ":".join(map(str, (*key, ""))).encode()  # formatted once: a task hashes ~6 blocks

    def _bytes(self, count: int) -> bytes:
        """The next `count` words as little-endian bytes."""
        first, stop = self.used, self.used + count
        blocks = range(first // _WORDS_PER_BLOCK, -(-stop // _WORDS_PER_BLOCK))
        raw = b"".join(hashlib.sha256(self._prefix + str(b).encode()).digest() for b in blocks)
        self.used = stop
        start = 8 * (first % _WORDS_PER_BLOCK)
        return raw[start : start + 8 * count]

    def words(self, count: int) -> list[int]:
        """The next `count` words, each in [0, 2**64): Python integers, exact."""
        raw = self._bytes(count)
        return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]

    def fractions(self, count: int) -> np.ndarray:
        """The next `count` words as float64 in [0, 1): each word's top 53 bits over 2**53 (exact)."""
        return (np.frombuffer(self._bytes(count), dtype="<u8") >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def below(self, bounds: list[int]) -> list[int]:
        """One integer in [0, bound) per bound: floor(word * bound / 2**64) (bias below bound / 2**64)."""
        return [(w * b) >> 64 for w, b in zip(self.words(len(bounds)), bounds)]

    def choice(self, population: int, count: int) -> np.ndarray:
        """`count` distinct integers of range(population) in the order drawn (partial Fisher-Yates)."""
        if count > population:
            raise ValueError(f"cannot draw {count} distinct items from {population}")
        picks = [i + j for i, j in enumerate(self.below(range(population, population - count, -1)))]
        moved, drawn = {}, []  # the shuffle's swaps, kept sparse: position -> item now there
        for i, j in enumerate(picks):
            drawn.append(moved.get(j, j))
            moved[j] = moved.get(i, i)
        return np.array(drawn, dtype=np.int64)


def permutation(count: int, *key: Key) -> np.ndarray:
    """range(count) sorted by SHA-256 of (key, index): a fixed shuffle that no library version changes."""
    return np.array(sorted(range(count), key=lambda i: _digest(*key, i)), dtype=np.int64)
