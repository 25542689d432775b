"""How a meta-batch's task seeds are cut into gradient chunks and the chunks into actors' shards.

Apart from the engine (no Ray here): the GPU-node benchmark harness chunks as the workers do.
"""

from __future__ import annotations

import numpy as np


def chunked(seeds: list[int], size: int) -> list[list[int]]:
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def split(items: list, parts: int, longer_first: bool = True) -> list[list]:
    """`items` in `parts` contiguous runs whose lengths differ by at most one, the longer ones first
    (or last)."""
    base, extra = divmod(len(items), parts)
    lengths = [base + (k < extra if longer_first else k >= parts - extra) for k in range(parts)]
    bounds = np.cumsum([0, *lengths])
    return [items[bounds[k] : bounds[k + 1]] for k in range(parts)]


def gradient_chunks(seeds: list, chunk: int | str, workers: int) -> list[list]:
    """An iteration's seeds in gradient chunks, fixed by config values alone (never by the live actors,
    so shrinking and growing back changes nothing): `chunk` tasks each (the last one shorter), or for
    `chunk` "auto" one chunk per configured worker, their sizes differing by at most one task."""
    if chunk == "auto":
        return split(seeds, workers)
    return chunked(seeds, chunk)


def shards(chunks: list, actors: int) -> list[list]:
    """One contiguous run of chunks per actor; no actor gets more than one chunk more than another, and
    the extra chunks go to the last actors, whose runs hold the short last chunk."""
    return split(chunks, actors, longer_first=False)
