"""The durable queue under MLflow tracking: what a crash or a full disk leaves is readable and appendable."""

from __future__ import annotations

import json
import subprocess
import sys

from platform.delivery import RunSpool
from platform.spool import Spool


def test_records_and_delivered_survive_a_reopen(tmp_path):
    spool = Spool(tmp_path / "s")
    for i in range(3):
        spool.append({"n": i})
    spool.set_delivered(2)
    again = Spool(tmp_path / "s")
    assert again.records == [{"n": 0}, {"n": 1}, {"n": 2}] and again.delivered == 2 and again.pending == 1


def test_a_torn_last_record_is_cut_so_later_records_are_not_lost(tmp_path):
    """Power loss mid-append leaves half a line; without the cut, the next append would continue that
    line and every later record would be unreadable on the next load."""
    spool = Spool(tmp_path / "s")
    spool.append({"n": 0})
    spool.append({"n": 1})
    spool.set_delivered(2)
    with open(tmp_path / "s" / "records.jsonl", "ab") as f:
        f.write(b'{"n": 2, "half')  # torn
    reopened = Spool(tmp_path / "s")
    assert reopened.records == [{"n": 0}, {"n": 1}]
    reopened.append({"n": 3})
    assert Spool(tmp_path / "s").records == [{"n": 0}, {"n": 1}, {"n": 3}]


def test_delivered_never_exceeds_the_records_and_sync_does_not_crash(tmp_path):
    """A delivered count saved before the torn record was cut away: clamped, and `track sync` has
    nothing to send instead of failing with an IndexError."""
    spool = RunSpool(tmp_path / "s", uri="http://127.0.0.1:9")
    spool.append({"op": "batch", "metrics": []})
    (tmp_path / "s" / "delivered").write_text("5")
    assert RunSpool(tmp_path / "s").delivered == 1
    done = subprocess.run(
        [sys.executable, "-m", "platform.track", "sync", str(tmp_path / "s")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "sent 0 records" in done.stdout, done.stderr


def test_a_refused_append_leaves_no_fragment(tmp_path):
    """ENOSPC (here a file that cannot grow past its size: RLIMIT_FSIZE in a child) mid-record:
    nothing of it stays, the spool reopens with the records before it."""
    script = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, like a full disk's ENOSPC
from platform.spool import Spool
spool = Spool({str(tmp_path / "s")!r})
spool.append({{"n": 0}})
resource.setrlimit(resource.RLIMIT_FSIZE, (20, 20))
try:
    spool.append({{"n": 1, "pad": "x" * 100}})
except OSError as e:
    print("refused", e.errno)
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert done.stdout.startswith("refused"), done.stderr
    assert (tmp_path / "s" / "records.jsonl").read_bytes() == json.dumps({"n": 0}).encode() + b"\n"
    assert Spool(tmp_path / "s").records == [{"n": 0}]
