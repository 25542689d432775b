"""In-process execution (platform.local): the same meta-iterations as the Ray actors', in the driver."""

from __future__ import annotations

import pytest
import ray
import torch
from conftest import folder_with_a_corrupt_image
from driver_runs import assert_same_params, finish, start_train

from platform.algorithms import vectorized
from platform.checkpoint import CheckpointStore
from platform.config import ConfigError, RunConfig, load_config
from platform.data import DataError
from platform.local import choose, execution
from platform.train import train

SMALL = [
    "task.kind=sinusoid",
    "optim.iterations=40",
    "optim.meta_batch=10",
    "optim.chunk=3",
    "eval.every=20",
    "eval.tasks=10",
    "log_every=10",
    "tracking.mlflow=false",
]


def test_a_local_run_ends_with_the_parameters_of_a_ray_run(ray_cluster, tmp_path, monkeypatch, capsys):
    """Same config, `auto` both times: through Ray actors under RAY_ADDRESS, in-process without it; the
    same parameters and meta-validation numbers bitwise, and the local run never touches Ray."""
    out = finish(start_train(ray_cluster, *SMALL, f"checkpoint.dir={tmp_path / 'ray'}"))
    assert "execution: ray (auto: RAY_ADDRESS names a cluster)" in out and "2 workers: pid" in out
    on_ray = CheckpointStore(tmp_path / "ray").load()

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    threads = torch.get_num_threads()
    local = train(load_config(None, [*SMALL, f"checkpoint.dir={tmp_path / 'local'}"]), observers=[])
    printed = capsys.readouterr().out
    assert printed.count("execution: local (auto: an MLP on one machine") == 1, printed
    assert "1 in-process worker: pid" in printed
    assert not ray.is_initialized()  # nothing on the local path starts or joins Ray
    assert torch.get_num_threads() == threads  # the worker's thread count was this process's for the run only
    assert_same_params(local["params"], on_ray["params"])
    validations = lambda state: [h["val"] for h in state["history"] if "val" in h]
    assert validations(local) == validations(on_ray) and len(validations(local)) == 2


def test_auto_computes_in_process_only_for_small_models_off_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = lambda *overrides: load_config(None, list(overrides))
    assert choose(config())[0] == "local"  # the default run: sinusoid MLP, 2 workers asked for
    conv = config("task.kind=omniglot", "model.kind=conv4")
    assert choose(conv) == ("ray", "auto: conv4 iterations are long enough for 2 actors to pay")
    assert choose(config("resources.gpus_per_worker=0.5"))[0] == "ray"
    assert choose(config("resources.execution=ray"))[0] == "ray"
    assert choose(config("task.kind=omniglot", "model.kind=conv4", "resources.execution=local"))[0] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # `ray job submit` sets it for its driver
    assert choose(config()) == ("ray", "auto: RAY_ADDRESS names a cluster")


def test_local_execution_with_gpus_is_a_config_error():
    config = load_config(None, ["resources.execution=local", "resources.gpus_per_worker=1"])
    with pytest.raises(ConfigError) as error:
        execution(config, log=lambda line: pytest.fail(f"said {line!r} before refusing"))
    (problem,) = error.value.problems
    assert "resources.execution = 'local'" in problem and "resources.gpus_per_worker = 0 (is 1)" in problem


def test_vectorize_auto_batches_the_mlp_on_cpu_and_keeps_the_loop_for_conv4():
    config = lambda **fields: RunConfig.model_validate(fields)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    conv = {"task": {"kind": "omniglot"}, "model": {"kind": "conv4"}}
    assert vectorized(config(), cpu) and vectorized(config(**conv), cuda)
    assert not vectorized(config(**conv), cpu)
    assert not vectorized(config(algorithm="reptile"), cpu)  # no vmap path: auto keeps the loop
    assert not vectorized(config(resources={"vectorize": "loop"}), cpu)
    assert vectorized(config(**conv, resources={"vectorize": "vmap"}), cpu)


def test_data_an_in_process_worker_cannot_read_is_a_data_error(tmp_path, monkeypatch):
    data = folder_with_a_corrupt_image(tmp_path / "data")
    overrides = ["task.kind=folder", f"task.data={data}", "task.ways=2", "task.shots=1", "task.query=1"]
    overrides += ["model.kind=conv4", "model.width=8", "optim.meta_batch=4", "optim.chunk=2", "eval.every=0"]
    overrides += ["resources.execution=local", "tracking.mlflow=false", f"checkpoint.dir={tmp_path / 'c'}"]
    with pytest.raises(DataError, match=r"task\.data = .*class3/1\.png: cannot read the image"):
        train(load_config(None, overrides), observers=[])
    assert CheckpointStore(tmp_path / "c").latest() is None


def test_a_stop_cuts_an_in_process_meta_validation_short_and_pieces_change_nothing():
    from platform.algorithms import build
    from platform.driver import meta_validate
    from platform.local import CANCEL_PIECE, LocalPool

    config = load_config(None, [*SMALL, f"eval.tasks={2 * CANCEL_PIECE + 7}"])
    _, _, params = build(config)
    pool = LocalPool(config)
    try:
        whole = meta_validate(pool, config, params)
        assert meta_validate(pool, config, params, cancel=lambda: False) == whole  # in 3 pieces
        checks = []
        stop_after_one_piece = lambda: checks.append(1) or len(checks) > 1
        assert meta_validate(pool, config, params, cancel=stop_after_one_piece) is None and len(checks) == 2
    finally:
        pool.shutdown()
