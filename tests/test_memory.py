"""An actor's memory is bounded by one gradient chunk, not by the meta-batch (second-order MAML, 5 steps).

Each case runs in a fresh process, so its peak resident set (VmHWM) is its own: an
AdaptationWorker computes one chunk, then many more in the same call. If anything outlived its
chunk (autograd graphs, adapted parameters, per-task activations), the peak would grow by about one
chunk's footprint per chunk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from platform.config import load_config
from platform.chunks import chunked
from platform.engine import AdaptationWorker, flatten

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

config = load_config(sys.argv[1], sys.argv[2:])
worker = AdaptationWorker(config.model_dump())
flat = flatten(worker.template)
chunks = chunked(list(range(8 * config.optim.chunk)), config.optim.chunk)
before = rss("VmRSS")
worker.outer_grads(flat, chunks[:1])
one = rss("VmHWM")
worker.outer_grads(flat, chunks[1:])
print(json.dumps({"before": before, "one_chunk": one, "eight_chunks": rss("VmHWM")}))
"""


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_peak_memory_does_not_grow_with_the_meta_batch(omniglot, vectorize):
    overrides = [
        "algorithm=maml",
        "optim.inner_steps=5",
        "optim.chunk=2",
        "optim.meta_batch=16",
        "model.width=32",
        f"resources.vectorize={vectorize}",
        "resources.workers=1",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO / "configs" / "omniglot-5w1s.yaml"), *overrides],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    chunk_footprint = m["one_chunk"] - m["before"]
    assert chunk_footprint > 20 * 2**20, m  # a chunk's activations are real memory, so growth would show
    # Seven more chunks: at most a fraction of one chunk's footprint more (allocator slack), never ~7x.
    assert m["eight_chunks"] - m["one_chunk"] < 0.5 * chunk_footprint, m
