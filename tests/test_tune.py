"""Ray Tune sweeps for real: `python -m platform.tune` drivers on the session's Ray head (4 CPUs),
tracking to the real MLflow server. Every trial is a full training with its own actor.

A trial here reserves 2 CPUs (its driver and one actor), so exactly two trials fit at once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from driver_runs import finish, read_until, start_command
from mlflow import MlflowClient

from platform.checkpoint import CheckpointStore
from platform.config import load_config
from platform.sweep import TrialReports, summarize

ITERATIONS = 40
BASE = [
    "task.kind=sinusoid",
    f"optim.iterations={ITERATIONS}",
    "optim.meta_batch=10",
    "optim.chunk=5",
    "eval.every=10",
    "eval.tasks=20",
    "log_every=10",
    "resources.workers=1",
]


def start_tune(cluster, root: Path, *args: str, uri: str, env: dict | None = None) -> subprocess.Popen:
    environment = cluster.subprocess_env(MLFLOW_TRACKING_URI=uri, **(env or {}))
    return start_command(["platform.tune", *BASE, f"checkpoint.dir={root}", *args], environment, root.parent)


RAY_LOG_LINE = re.compile(r"(\x1b\[\d+m)?\(\w+ pid=\d+")


def table(out: str) -> list[list[str]]:
    """The rows of the sweep's closing table: trial, eta, lambda, steps, best metric, iterations, early-stopped."""
    lines = out.splitlines()
    (start,) = [
        i for i, line in enumerate(lines) if line.startswith("trial ") and line.rstrip().endswith("early-stopped")
    ]
    rows = []
    for line in lines[start + 1 :]:
        if RAY_LOG_LINE.match(line):  # a trial's log, forwarded by Ray, can land between the rows
            continue
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def children(client: MlflowClient, parent_id: str):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parent_of(out: str) -> str:
    return re.search(r"MLflow parent run (\w+)", out)[1]


def max_overlap(runs) -> int:
    """Most runs alive at one instant, a run living from its start to its last metric."""
    events = []
    for run in runs:
        events += [(run.info.start_time, 1), (run.data.last_metric_ms, -1)]
    alive = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        alive += delta
        peak = max(peak, alive)
    return peak


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("asha") / "sweep"
    args = ["--samples", "6", "--scheduler", "asha", "tracking.register_as=sinusoid-sweep-best"]
    # Without Tune's per-trial result files: the closing table and the best trial must come from
    # what trials reported (a PBT sweep in CI once found those files unreadable and named no best).
    env = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    out = finish(start_tune(ray_cluster, root, *args, uri=mlflow_server.url, env=env), 900)
    return out, root


def test_a_sweep_runs_two_trials_at_a_time_and_asha_stops_some_early(asha_sweep, mlflow_server):
    out, _ = asha_sweep
    rows = table(out)
    assert len(rows) == 6, out[-3000:]
    stopped = [r for r in rows if r[-1] == "yes"]
    assert stopped and len(stopped) < 6, rows  # ASHA cut some trials short, not all
    assert all(int(r[-2]) == ITERATIONS for r in rows if r[-1] == "no")

    client = MlflowClient(mlflow_server.url)
    runs = children(client, parent_of(out))
    assert len(runs) == 6
    for run in runs:
        run.data.last_metric_ms = max(
            m.timestamp for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)
        )
    assert max_overlap(runs) == 2  # the cluster's 4 CPUs hold two trials of 2, never more
    by_trial = {run.data.tags["tune.trial"]: run for run in runs}
    for row in rows:
        run = by_trial[row[0]]
        eta, lam, steps = float(row[1]), float(row[2]), int(row[3])
        assert float(run.data.params["optim.inner_lr"]) == pytest.approx(eta, rel=1e-3)
        assert float(run.data.params["optim.outer_lr"]) == pytest.approx(lam, rel=1e-3)
        assert int(run.data.params["optim.inner_steps"]) == steps
        mse = [m.value for m in client.get_metric_history(run.info.run_id, "val/mse")]
        assert min(mse) == pytest.approx(float(row[4]), abs=1e-4)
        if row[-1] == "yes":
            assert run.info.status == "KILLED" and run.data.tags["tune.stopped_early"] == "true"
        else:
            assert run.info.status == "FINISHED"


def test_the_parent_run_records_the_best_trial_and_its_config_trains(asha_sweep, mlflow_server, ray_cluster, tmp_path):
    out, root = asha_sweep
    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(parent_of(out))
    best = re.search(r"best trial (\w+): val_mse ([\d.]+)", out)
    assert parent.data.tags["best.trial"] == best[1]
    assert parent.data.metrics["best/val_mse"] == pytest.approx(float(best[2]), abs=1e-4)
    assert "space.optim.inner_lr" in parent.data.params and parent.info.status == "FINISHED"
    assert "best.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    # The best trial's model is registered, and only it: trials do not register their own.
    (version,) = client.search_model_versions("name = 'sinusoid-sweep-best'")
    assert version.run_id == parent.data.tags["best.run_id"]
    assert parent.data.tags["registered_model"] == f"sinusoid-sweep-best version {version.version}"
    assert client.get_run(version.run_id).data.tags["tune.trial"] == best[1]
    best_yaml = root / "best.yaml"
    config = yaml.safe_load(best_yaml.read_text())
    assert config["checkpoint"]["dir"] == str(root / "best")
    result = subprocess.run(
        [sys.executable, "-m", "platform.train", "--config", str(best_yaml), "tracking.mlflow=false"],
        env=ray_cluster.subprocess_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    trained = CheckpointStore(root / "best").load()
    assert trained["iteration"] == ITERATIONS and trained["config"]["optim"]["inner_lr"] == config["optim"]["inner_lr"]


def test_pbt_exploits_a_better_trial_and_records_it(ray_cluster, mlflow_server, tmp_path):
    root = tmp_path / "pbt"
    out = finish(start_tune(ray_cluster, root, "--samples", "2", "--scheduler", "pbt", uri=mlflow_server.url), 900)
    assert "restored trial" in out, out[-3000:]
    client = MlflowClient(mlflow_server.url)
    exploited = [r for r in children(client, parent_of(out)) if "pbt.last_exploit" in r.data.tags]
    assert exploited, "no trial's MLflow run records an exploit"
    run = exploited[0]
    assert re.match(r"restored trial \w+'s checkpoint at iteration \d+; optim\.", run.data.tags["pbt.last_exploit"])
    # The hyperparameters' schedule is in the run: a value before and one after the exploit.
    starts = client.get_metric_history(run.info.run_id, "hparams/inner_lr")  # one point per (re)start
    assert len({m.step for m in starts}) >= 2
    # After its last restore its curve goes on from the restored iteration, every step once, also
    # when the donor's checkpoint was older than the trial's own last step (the curve branches there).
    last = max(starts, key=lambda m: m.timestamp)
    after = [m.step for m in client.get_metric_history(run.info.run_id, "val/mse") if m.timestamp >= last.timestamp]
    assert sorted(after) == list(range(last.step + 10, ITERATIONS + 1, 10)), (last.step, after)
    # The closing table gives each trial's best value and the hyperparameters in effect when it was
    # reached: not its donor's, which a PBT trial's last result to Tune may carry.
    rows = {row[0]: row for row in table(out)}
    for child in children(client, parent_of(out)):
        row = rows[child.data.tags["tune.trial"]]
        curve = client.get_metric_history(child.info.run_id, "val/mse")
        at = min(curve, key=lambda m: m.value)
        assert float(row[4]) == pytest.approx(at.value, abs=1e-4), (row, [(m.step, m.value) for m in curve])
        starts = client.get_metric_history(child.info.run_id, "hparams/inner_lr")
        in_effect = max((m for m in starts if m.timestamp <= at.timestamp), key=lambda m: m.timestamp)
        assert float(row[1]) == pytest.approx(in_effect.value, rel=1e-3), (row, starts)


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(ray_cluster, mlflow_server, tmp_path):
    root = tmp_path / "resumable"
    args = ["--samples", "3", "--scheduler", "fifo", "--max-concurrent", "1", "--search", "optuna"]
    # Tune saves the sweep's state every 10 s at least by default; here every second, so that the
    # kill below comes after the state that records the finished trial.
    env = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = start_tune(ray_cluster, root, *args, uri=mlflow_server.url, env=env)
    read_until(proc, r"Trial \w+ completed", timeout=300)
    time.sleep(3)
    proc.kill()
    proc.communicate()
    info = json.loads((root / "sweep.json").read_text())
    final = {p.parents[1].name: p for p in root.glob(f"tune/trial_*/checkpoints/ckpt-{ITERATIONS:08d}.pt")}
    assert final, "no trial finished before the kill"
    before = {name: path.stat().st_mtime_ns for name, path in final.items()}

    out = finish(start_tune(ray_cluster, root, *args, "--resume", uri=mlflow_server.url, env=env), 900)
    assert "resuming the sweep" in out
    assert parent_of(out) == info["parent_run_id"]
    for name, mtime in before.items():  # finished trials were not run again
        assert final[name].stat().st_mtime_ns == mtime
        assert f"Trial run_{name} started" not in out
    rows = table(out)
    assert len(rows) == 3 and all(r[-2] == str(ITERATIONS) for r in rows), out[-4000:]
    runs = children(MlflowClient(mlflow_server.url), info["parent_run_id"])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}


def test_the_closing_table_comes_from_every_result_the_driver_received(tmp_path):
    """What PBT leaves in Tune's records, without a sweep: a trial's last result is its donor's copy,
    and the result it was paused on has no checkpoint in Tune's bookkeeping."""
    from ray.tune import Checkpoint, Result
    from ray.tune.experiment import Trial

    config = load_config(None, BASE)
    reports = TrialReports("val_mse")
    a, b = {"optim.inner_lr": 0.01}, {"optim.inner_lr": 0.02}
    sent = {  # trial: [(iteration, val_mse, config)]
        "t_a": [(10, 3.9, a), (20, 3.8, a), (40, 3.1, b)],  # paused at 20, exploited the other, went on
        "t_b": [(10, 3.5, b), (20, float("nan"), b), (40, 3.3, b)],
        "t_c": [(10, 4.0, a), (20, 3.95, a)],  # paused at 20, then the sweep ended
        "t_d": [(10, float("nan"), a)],  # diverged
    }
    for trial_id, results in sent.items():
        for iteration, value, hyperparameters in results:
            result = {"iteration": iteration, "val_mse": value, "loss": 1.0, "config": hyperparameters}
            reports.on_trial_result(0, [], Trial("run_trial", trial_id=trial_id, stub=True), result)
    restored = TrialReports("val_mse")  # as a resumed sweep gets it back from Tune's saved state
    restored.set_state(reports.get_state())

    def result(trial_id: str, kept: list[int]) -> Result:
        checkpoints = []
        for iteration, value, hyperparameters in sent[trial_id]:
            if iteration in kept:
                folder = tmp_path / trial_id / f"checkpoint_{iteration}"
                folder.mkdir(parents=True)
                metrics = {"iteration": iteration, "val_mse": value, "config": hyperparameters}
                checkpoints.append((Checkpoint.from_directory(str(folder)), metrics))
        last = {"iteration": 40, "val_mse": 3.3, "config": {"optim.inner_lr": 0.03}}  # a donor's copy
        return Result(last, None, None, str(tmp_path / f"trial_{trial_id}"), best_checkpoints=checkpoints)

    results = [result("t_a", [10, 40]), result("t_b", [10, 20, 40]), result("t_c", [10]), result("t_d", [10])]
    table, best = summarize(results, restored, config)
    rows = {row["trial"]: row for row in table}
    assert (rows["t_a"]["value"], rows["t_a"]["iteration"], rows["t_a"]["config"]) == (3.1, 40, b)
    assert (rows["t_a"]["iterations"], rows["t_a"]["stopped"]) == (40, False)
    assert (rows["t_b"]["value"], rows["t_b"]["iteration"]) == (3.3, 40)
    assert (rows["t_c"]["value"], rows["t_c"]["config"], rows["t_c"]["iterations"]) == (3.95, a, 20)
    assert rows["t_c"]["stopped"]
    assert (rows["t_d"]["value"], rows["t_d"]["iterations"]) == (None, 10)
    assert best["trial"] == "t_a" and best["checkpoint"] == str(tmp_path / "t_a" / "checkpoint_40")
    assert summarize([results[3]], restored, config)[1] is None  # nothing finite: no best


def test_bad_search_spaces_exit_2_naming_each_problem(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "optim.inner_rate": {"loguniform": [0.001, 0.1]},  # no such key
                "optim.inner_steps": {"loguniform": [1, 5]},  # an integer key
                "optim.outer_lr": {"uniform": [0.01, 0.001]},  # empty range
                "optim.inner_lr": {"uniform": [-0.1, 0.5]},  # reaches a negative learning rate
                "resources.workers": {"choice": [1, 50]},  # 50 workers: more than the chunks
                "algorithm": {"gaussian": [0, 1]},  # no such distribution
            },
            sort_keys=False,
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "platform.tune", *BASE, "--space", str(space), f"checkpoint.dir={tmp_path / 's'}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 6 and "Traceback" not in result.stderr, result.stderr
    expected = [
        "optim.inner_rate: not a config key",
        "optim.inner_steps: loguniform draws floats; optim.inner_steps is an integer",
        "optim.outer_lr: uniform [0.01, 0.001] is an empty range",
        "optim.inner_lr: uniform [-0.1, 0.5] reaches -0.1, and then",
        "resources.workers: choice [1, 50] reaches 50, and then",
        "algorithm = {'gaussian': [0, 1]}: expected one of",
    ]
    for line, want in zip(errors, expected):
        assert line.startswith(f"error: {space}: {want}"), (line, want)
    assert "greater than 0" in errors[3] and "more workers than the 2 gradient chunks" in errors[4]
    assert not (tmp_path / "s").exists()  # nothing was started or written


def test_a_sweep_in_s3_keeps_everything_there_and_resumes(ray_cluster, mlflow_server, s3_bucket, tmp_path):
    """checkpoint.dir = s3://...: what every trial node reaches on a cluster without a shared volume.
    The trials' processes run with the cluster's environment (the test head may lack the AWS_*
    settings): they reach S3 through the filesystem the driver hands to Tune."""
    import boto3

    location = f"s3://{s3_bucket}/sweeps/s3"
    args = ["--samples", "2", "--scheduler", "fifo", "optim.iterations=20", f"checkpoint.dir={location}"]
    out = finish(start_tune(ray_cluster, tmp_path / "unused", *args, uri=mlflow_server.url), 600)
    assert len(table(out)) == 2 and f"best config: {location}/best.yaml" in out, out[-3000:]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="sweeps/s3/")["Contents"]]
    assert {"sweeps/s3/sweep.json", "sweeps/s3/best.yaml"} <= set(keys)
    assert any(re.fullmatch(r"sweeps/s3/tune/experiment_state-.*\.json", k) for k in keys), keys
    # Every reported result's checkpoint is in S3: each of the 2 trials reported at iterations 10 and 20.
    checkpoints = {k.rsplit("/", 1)[0] for k in keys if re.search(r"/tune/trial_\w+/checkpoint_\d+/ckpt-\d+\.pt$", k)}
    assert len(checkpoints) == 2 * 2, sorted(checkpoints)
    best = yaml.safe_load(boto3.client("s3").get_object(Bucket=s3_bucket, Key="sweeps/s3/best.yaml")["Body"].read())
    assert best["checkpoint"]["dir"] == f"{location}/best"
    client = MlflowClient(mlflow_server.url)
    assert "best.yaml" in [a.path for a in client.list_artifacts(parent_of(out))]
    assert not (tmp_path / "unused").exists()  # nothing local
    # The trials reached S3 with the driver's credentials, yet no file of the sweep holds them
    # (Tune pickles its storage filesystem into tuner.pkl; --resume unpickles it).
    s3 = boto3.client("s3")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    leaks = [k for k in keys if secret in s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read()]
    assert any(k.endswith("tuner.pkl") for k in keys) and leaks == [], leaks

    again = finish(start_tune(ray_cluster, tmp_path / "unused", *args, "--resume", uri=mlflow_server.url), 600)
    assert f"resuming the sweep from {location}/tune" in again and parent_of(again) == parent_of(out)
    assert len(table(again)) == 2
