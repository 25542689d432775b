"""CheckpointStore against a local folder and a real S3 server (moto on loopback)."""

import dataclasses
import io
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from platform.checkpoint import CheckpointError, CheckpointStore, CheckpointWriter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpts")
    return f"s3://{request.getfixturevalue('s3_bucket')}/some/prefix"


def put_raw(location: str, name: str, data: bytes) -> None:
    """Write bytes beside the store's checkpoints, bypassing the store."""
    if location.startswith("s3://"):
        import boto3

        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    else:
        path = Path(location, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def training_state(iteration: int) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(iteration)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    state = {
        "iteration": iteration,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "config": {"algorithm": "maml", "inner_lr": 0.4, "ways": 5, "shots": [1, 5], "first_order": False},
        "metrics": [{"step": 1, "loss": 1.5, "acc": np.float32(0.25)}, {"step": 2, "loss": 1.25}],
        "support_idx": np.arange(10, dtype=np.int64),
    }
    return state, model


def test_round_trip_restores_model_and_optimizer(location):
    state, model = training_state(500)
    store = CheckpointStore(location)

    written = store.save(state, 500)

    assert written == f"{location}/ckpt-00000500.pt"
    loaded = store.load()
    assert_same(loaded, state)
    restored = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    restored.load_state_dict(loaded["params"])
    optimizer = torch.optim.Adam(restored.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])
    assert_same(optimizer.state_dict(), state["optimizer"])
    x = torch.randn(3, 4)
    assert torch.equal(restored(x), model(x))


def test_latest_and_iterations_ascending(location):
    store = CheckpointStore(location, keep=5)
    for iteration in (20, 3, 100, 7):
        store.save({"iteration": iteration}, iteration)

    assert store.iterations() == [3, 7, 20, 100]
    assert store.latest() == 100
    assert store.load() == {"iteration": 100}
    assert store.load(3) == {"iteration": 3}
    # A second store on the same location sees the same checkpoints.
    assert CheckpointStore(location).iterations() == [3, 7, 20, 100]


def test_a_run_going_on_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    """A Tune trial restored at iteration 10 (PBT's exploit of a slower trial) into its own folder,
    which holds its 20 and 30 of the branch it left: those move to superseded-10/ with their digests,
    nothing is lost, and the trial's new 20 is written (a checkpoint is never rewritten in place)."""
    store = CheckpointStore(tmp_path, keep=5)
    for iteration in (10, 20, 30):
        store.save({"iteration": iteration, "branch": "old"}, iteration)
    with pytest.raises(CheckpointError, match="a different checkpoint 20 exists"):
        store.save({"iteration": 20, "branch": "new"}, 20)

    assert store.set_aside_after(10) == [20, 30]
    assert store.iterations() == [10]
    store.save({"iteration": 20, "branch": "new"}, 20)
    assert store.load(20) == {"iteration": 20, "branch": "new"}
    aside = CheckpointStore(tmp_path / "superseded-10")
    assert aside.iterations() == [20, 30] and aside.load(30) == {"iteration": 30, "branch": "old"}
    # Again from 10: the next branch goes beside the first, which stays whole.
    assert store.set_aside_after(10) == [20]
    assert CheckpointStore(tmp_path / "superseded-10-1").iterations() == [20] and aside.iterations() == [20, 30]
    assert store.set_aside_after(10) == []


def test_keeps_the_newest_n_and_never_the_one_just_written(location):
    store = CheckpointStore(location, keep=2)
    for iteration in range(1, 6):
        store.save({"iteration": iteration}, iteration)
        assert store.iterations() == list(range(max(1, iteration - 1), iteration + 1))

    store.save({"iteration": 2}, 2)  # older than those kept, still not deleted

    assert store.iterations() == [2, 4, 5]
    with pytest.raises(CheckpointError, match="ckpt-00000001.pt"):
        store.load(1)


def test_ignores_names_that_are_not_checkpoints(location):
    store = CheckpointStore(location)
    store.save({"iteration": 1}, 1)
    for name in ("notes.txt", "ckpt-2.pt", ".ckpt-00000009.pt.x1y2.tmp", "nested/ckpt-00000008.pt"):
        put_raw(location, name, b"not a checkpoint")
    put_raw(location + "2", "ckpt-00000007.pt", b"a sibling prefix")

    assert store.iterations() == [1]


def test_empty_store(location):
    store = CheckpointStore(location)

    assert store.latest() is None
    assert store.iterations() == []
    with pytest.raises(CheckpointError, match="no checkpoint") as error:
        store.load()
    assert location.rstrip("/") in str(error.value)


def damaged(data: bytes, damage: str) -> bytes:
    if damage == "truncated":
        return data[: len(data) // 2]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit: torch.load may still read it, the digest does not match
    return bytes(flipped)


def read_raw(location: str, name: str) -> bytes:
    if location.startswith("s3://"):
        import boto3

        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        return boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
    return Path(location, name).read_bytes()


@pytest.mark.parametrize("damage", ["bitflip", "truncated"])
def test_damaged_newest_falls_back_to_the_newest_intact_one(location, damage, caplog):
    store = CheckpointStore(location)
    store.save({"iteration": 1}, 1)
    store.save(training_state(2)[0], 2)
    put_raw(location, "ckpt-00000002.pt", damaged(read_raw(location, "ckpt-00000002.pt"), damage))

    assert store.latest() == 2
    assert store.load() == {"iteration": 1}
    assert f"{location}/ckpt-00000002.pt: damaged checkpoint" in caplog.text  # the warning names it
    with pytest.raises(CheckpointError, match="damaged checkpoint") as error:
        store.load(2)  # asked for by number: no fall back
    assert f"{location}/ckpt-00000002.pt" in str(error.value)


def test_all_damaged_names_every_one(location):
    store = CheckpointStore(location)
    for iteration in (1, 2):
        store.save({"iteration": iteration}, iteration)
        name = f"ckpt-{iteration:08d}.pt"
        put_raw(location, name, damaged(read_raw(location, name), "truncated"))

    with pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        store.load()
    assert f"{location}/ckpt-00000001.pt" in str(error.value) and f"{location}/ckpt-00000002.pt" in str(error.value)


def test_a_checkpoint_without_its_digest_is_not_trusted(location):
    store = CheckpointStore(location)
    store.save({"iteration": 1}, 1)
    put_raw(location, "ckpt-00000002.pt", _saved_bytes({"iteration": 2}))  # as an older version wrote them

    assert store.load() == {"iteration": 1}
    with pytest.raises(CheckpointError, match=r"its digest ckpt-00000002.pt.sha256 is missing"):
        store.load(2)


def test_pruning_waits_for_the_new_checkpoint_to_verify(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.save({"iteration": 1}, 1)
    store._backend.read = lambda name: b"what the disk gave back"  # a write that did not land intact

    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        store.save({"iteration": 2}, 2)
    assert (tmp_path / "ckpt-00000001.pt").exists()  # the intact one was not pruned to make room


def _saved_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@dataclasses.dataclass
class Config:
    lr: float


def test_state_that_load_would_refuse_is_refused_at_save(location):
    store = CheckpointStore(location)

    with pytest.raises(CheckpointError, match="Config"):
        store.save({"config": Config(lr=0.1)}, 1)

    assert store.iterations() == []


def test_location_under_a_regular_file_raises(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    location = tmp_path / "file" / "ckpts"

    with pytest.raises(CheckpointError, match="cannot create checkpoint folder") as error:
        CheckpointStore(location)
    assert str(location) in str(error.value)


def test_location_that_turns_unwritable_raises_at_save(tmp_path):
    location = tmp_path / "ckpts"
    store = CheckpointStore(location)
    location.rmdir()
    location.write_text("now a file")

    with pytest.raises(CheckpointError, match="cannot write") as error:
        store.save({"iteration": 1}, 1)
    assert str(location / "ckpt-00000001.pt") in str(error.value)


def test_missing_bucket_raises(s3_server):
    with pytest.raises(CheckpointError, match="s3://no-such-bucket-0123/some/prefix/"):
        CheckpointStore("s3://no-such-bucket-0123/some/prefix")


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


def test_writer_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    location = tmp_path / "ckpts"
    # The writer saves iteration 1, then is SIGKILLed while iteration 2's bytes sit in the temp
    # file, before the fsync and the rename.
    writer = textwrap.dedent(
        """
        import os, sys, time, torch
        from platform.checkpoint import CheckpointStore

        store = CheckpointStore(sys.argv[1])
        store.save({"iteration": 1}, 1)

        def hang(fd):
            print("writing", flush=True)
            time.sleep(60)

        os.fsync = hang
        store.save({"iteration": 2, "params": torch.zeros(1_000_000)}, 2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(location)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    temps = [p.name for p in location.iterdir() if p.name.startswith(".")]
    assert len(temps) == 1 and temps[0].startswith(".ckpt-00000002.pt.")

    store = CheckpointStore(location)
    assert store.iterations() == [1]
    assert store.load() == {"iteration": 1}

    store.save({"iteration": 3}, 3)  # cleans up the crashed writer's temp file and its stray digest
    assert sorted(p.name for p in location.iterdir()) == [
        "ckpt-00000001.pt",
        "ckpt-00000001.pt.sha256",
        "ckpt-00000003.pt",
        "ckpt-00000003.pt.sha256",
    ]


@pytest.fixture
def restartable_s3(monkeypatch):
    """An S3 server of the test's own, so it can be stopped and started (same port) as an outage."""
    from services import S3Server

    with S3Server() as server:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        # Each attempt gives up fast: what is tested is our retrying, not boto3's.
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        yield server


def test_writer_retries_through_a_storage_outage_and_reports_it_twice(restartable_s3):
    import boto3

    boto3.client("s3").create_bucket(Bucket="ckpts")
    reports = []
    writer = CheckpointWriter(CheckpointStore("s3://ckpts/run"), report=reports.append, max_backoff_s=0.5)
    try:
        writer.submit({"iteration": 1}, 1)
        assert writer.flush(30) == "s3://ckpts/run/ckpt-00000001.pt"
        restartable_s3.stop()
        for iteration in (2, 3, 4):  # training goes on: submit never blocks, the newest supersedes
            assert writer.submit({"iteration": iteration}, iteration) == f"s3://ckpts/run/ckpt-{iteration:08d}.pt"
        with pytest.raises(CheckpointError, match=r"ckpt-00000004.pt: still not written after 2s") as error:
            writer.flush(2)
        assert "newest checkpoint written is s3://ckpts/run/ckpt-00000001.pt" in str(error.value)
        restartable_s3.start()  # an empty store again: moto keeps nothing
        boto3.client("s3").create_bucket(Bucket="ckpts")
        assert writer.flush(30) == "s3://ckpts/run/ckpt-00000004.pt"
    finally:
        writer.close()
    assert len(reports) == 2, reports
    assert reports[0].startswith("checkpoint storage failed (s3://ckpts/run/") and "retrying" in reports[0]
    assert reports[1] == "checkpoint storage is back: wrote s3://ckpts/run/ckpt-00000004.pt"
    assert CheckpointStore("s3://ckpts/run").load() == {"iteration": 4}


def test_a_checkpoint_is_never_rewritten_with_other_bytes(location):
    """Rewriting would replace the digest before the data: a crash between the two would leave the
    only copy of that iteration looking damaged. The same bytes again (a retried write) are fine."""
    store = CheckpointStore(location)
    first = store.encode({"iteration": 3, "run": "a"})
    where = store.save({"iteration": 3, "run": "a"}, 3)
    assert store.write(first, 3) == where
    with pytest.raises(CheckpointError, match="a different checkpoint 3 exists; not rewriting it"):
        store.save({"iteration": 3, "run": "b"}, 3)
    assert store.load(3) == {"iteration": 3, "run": "a"}


def test_one_writer_per_folder(tmp_path):
    from platform.config import ConfigError

    with (
        CheckpointStore(tmp_path).exclusive(),
        pytest.raises(ConfigError, match="another run is writing checkpoints there now"),
        CheckpointStore(tmp_path).exclusive(),
    ):
        pass
    with CheckpointStore(tmp_path).exclusive():  # released
        pass


def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    """The default checkpoint.dir is shared by every default run: a second one would write over the
    first's same-numbered checkpoints and prune the rest. Refused before anything starts."""
    CheckpointStore(tmp_path).save({"iteration": 5}, 5)
    done = subprocess.run(
        [sys.executable, "-m", "platform.train", f"checkpoint.dir={tmp_path}", "tracking.mlflow=false"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "holds another run's checkpoints (the newest at iteration 5)" in errors[0] and "--resume" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "ckpt-00000005.pt",
        "ckpt-00000005.pt.sha256",
    ]
