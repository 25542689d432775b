"""algorithm pretrain (RFS) end to end: real `python -m platform.train` drivers running Ray Train (2 DDP
workers, gloo) on the session cluster, pre-training a narrow conv4 on the shared CIFAR-10 photographs;
then meta-test, the learner API and the MLflow model on its checkpoint, in process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from driver_runs import assert_same_params, finish, read_until, start_train
from sklearn.linear_model import LogisticRegression

from platform.checkpoint import CheckpointStore
from platform.config import ConfigError, load_config, with_values
from platform.engine import EVAL_METRICS, AdaptationWorker, flatten
from platform.learner import learner_from
from platform.metatest import meta_test
from platform.mlflow_model import save_model
from platform.pretrain import body_params, classifier, learning_rate, make_sgd, shard, training_images
from platform.probe import fit_logistic
from platform.tasks import evaluation_seeds, task_sampler
from platform.train import initial_model, train

PRESET = "configs/cifar10-pretrain.yaml"
STEPS = 80
BRIEF = [
    "model.width=16",
    f"optim.iterations={STEPS}",
    "checkpoint.every=10",
    "checkpoint.keep=100",
    "eval.every=40",
    "eval.tasks=20",
    "log_every=10",
]
TASKS = 100


def run_args(cifar10_source, where, *overrides: str) -> list[str]:
    return ["--config", PRESET, f"task.data={cifar10_source}", f"checkpoint.dir={where}", *BRIEF, *overrides]


@pytest.fixture(scope="module")
def reference(ray_cluster, cifar10_source, tmp_path_factory):
    """(config, checkpoint folder, driver output) of an uninterrupted 2-worker run, tracked to MLflow (~25 s)."""
    where = tmp_path_factory.mktemp("pretrain-reference")
    out = finish(start_train(ray_cluster, *run_args(cifar10_source, where)), timeout=300)
    config = load_config(PRESET, [f"task.data={cifar10_source}", f"checkpoint.dir={where}", *BRIEF])
    return config, where, out


def test_a_run_reports_steps_validation_and_its_mlflow_run(reference):
    _, where, out = reference
    assert "execution: Ray Train, 2 DDP worker(s); 3600 training images of 6 classes, 56 steps per epoch" in out
    assert re.search(r"iter\s+80/80  epoch   1\.42  loss [\d.]+  acc [\d.]+", out), out
    assert len(re.findall(r"meta-validation at (40|80): accuracy [\d.]+ ± [\d.]+", out)) == 2, out
    state = CheckpointStore(where).load()
    assert state["iteration"] == STEPS and [h["iteration"] for h in state["history"]] == list(range(1, STEPS + 1))
    assert state["params"]["head.weight"].shape == (6, 64)  # all 6 meta-training classes; 2x2 x 16 features
    run = mlflow.MlflowClient().get_run(state["observers"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["algorithm"] == "pretrain"
    assert {"train/loss", "train/accuracy", "val/accuracy", "val/accuracy_ci95"} <= run.data.metrics.keys()


def test_pretraining_beats_chance_and_the_untrained_embedding(reference):
    """2-way 5-shot on the held-out classes (automobile, deer) with the logistic probe: chance is 1/2, and
    random conv features already separate these two by colour, so training must beat those too."""
    config, where, _ = reference
    initial = dict(classifier(config, 6).named_parameters())
    before = meta_test(config, initial, "test", TASKS, 0)
    after = meta_test(config, CheckpointStore(where).load()["params"], "test", TASKS, 0)
    assert after["accuracy"] - after["accuracy_ci95"] > 0.5, after
    assert after["accuracy"] - after["accuracy_ci95"] > before["accuracy"] + before["accuracy_ci95"], (before, after)
    centroid = config.model_copy(update={"pretrain": config.pretrain.model_copy(update={"probe": "centroid"})})
    nearest = meta_test(centroid, CheckpointStore(where).load()["params"], "test", TASKS, 0)
    assert nearest["accuracy"] - nearest["accuracy_ci95"] > 0.5, nearest


def test_two_workers_take_the_mean_of_their_shares_gradients(reference):
    """Why 2 workers cannot equal 1 bitwise: each worker's BatchNorm normalises its own half of the batch
    (another function, not only another summation order). What holds, bitwise: the 2-worker steps are
    SGD on the mean of the two halves' gradients, each half computed apart (1 thread, as each worker)."""
    config, where, _ = reference
    torch.set_num_threads(1)
    data = training_images(config)
    model = classifier(config, data.classes)
    optimizer = make_sgd(config, model.parameters())
    for step in range(10):
        grads = []
        for rank in range(2):
            model.zero_grad()
            x, y = shard(config, data, step, rank, 2)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = g0 * 0.5 + g1 * 0.5  # DDP: each worker's gradient times 1/world, summed
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.step()
    assert_same_params(dict(model.named_parameters()), CheckpointStore(where).load(10)["params"])


def test_a_lost_worker_and_a_ctrl_c_change_nothing(ray_cluster, reference, cifar10_source, tmp_path):
    """One driver: rank 1 SIGKILLed mid-run, so the worker group restarts from the newest state; then
    Ctrl-C, which rank 0 sees after the next step, whose state is checkpointed. --resume ends with the
    uninterrupted run's parameters, bitwise; resuming with another worker count is refused."""
    _, where, _ = reference
    args = run_args(cifar10_source, tmp_path, "tracking.mlflow=false")
    proc = start_train(ray_cluster, *args)
    pid = int(read_until(proc, r"pid=(\d+)\) world_rank=1", timeout=240)[0][1])
    read_until(proc, r"iter\s+20/")
    os.kill(pid, signal.SIGKILL)
    lost = read_until(proc, r"Ray Train lost a worker \(worker 1: .*\); restarting its 2 workers from iteration (\d+)")
    assert lost[0][1] in ("20", "30"), lost[1]
    read_until(proc, r"iter\s+50/", timeout=240)
    proc.send_signal(signal.SIGINT)
    out = finish(proc, timeout=120, returncode=130)
    stopped = int(re.search(r"SIGINT: stopped after iteration (\d+)", out)[1])
    assert 50 <= stopped < STEPS and CheckpointStore(tmp_path).latest() == stopped, out
    refused = finish(start_train(ray_cluster, *args, "resources.workers=1", "--resume"), returncode=2)
    assert "error: --resume from" in refused and "resources.workers = 1: the checkpoint was trained with 2" in refused
    out = finish(start_train(ray_cluster, *args, "--resume"), timeout=300)
    assert f"resumed from {tmp_path} at iteration {stopped}" in out and "0 worker failures, 0 restarts" in out
    assert_same_params(CheckpointStore(tmp_path).load()["params"], CheckpointStore(where).load()["params"])


def test_the_learner_api_and_the_mlflow_model_are_meta_test_s_computation(reference, tmp_path):
    config, where, _ = reference
    params = CheckpointStore(where).load()["params"]
    rows = AdaptationWorker(config.model_dump(mode="json")).evaluate(
        flatten(body_params(params)), "test", 0, evaluation_seeds(5)
    )
    learner = learner_from(config, params, bn_stats="batch")  # the run's statistics, as meta-test
    model = mlflow.pyfunc.load_model(str(save_model(config, params, tmp_path / "model")))
    sampler = task_sampler(config.task, "test")
    for seed, row in zip(evaluation_seeds(5), rows):
        task = sampler.sample(seed)
        predictions = learner.adapt(task.support_x, task.support_y.tolist()).predict(task.query_x)
        accuracy = np.mean(np.array(predictions.labels) == task.query_y.numpy())
        assert accuracy == pytest.approx(row[EVAL_METRICS.index("accuracy")], abs=1e-6)
        served = model.predict(
            {"support_x": task.support_x.numpy(), "support_y": task.support_y.numpy().astype(object),
             "query_x": task.query_x.numpy()},
            params={"bn_stats": "batch"},
        )  # fmt: skip
        assert served["labels"].tolist() == predictions.labels
    # An embedding's probe takes any number of labels (the head over the 6 training classes is not used).
    assert learner.head_outputs is None


def test_protonet_from_the_pretrained_body_meta_baseline(reference, cifar10_source, tmp_path):
    """model.init_from: an episodic run (ProtoNets, in process) starts from the pre-trained body and learns;
    a checkpoint of another body is refused, naming the field."""
    _, where, _ = reference
    args = [f"task.data={cifar10_source}", "model.width=16", f"model.init_from={where}", "optim.meta_batch=4"]
    args += ["optim.chunk=2", "optim.iterations=10", "eval.every=0", f"checkpoint.dir={tmp_path}"]
    episodic = load_config("configs/cifar10-protonet.yaml", [*args, "tracking.mlflow=false", "resources.workers=1"])
    episodic = with_values(episodic, {"resources.execution": "local"})
    params, _ = initial_model(episodic)
    assert_same_params({k: v.detach() for k, v in params.items()}, body_params(CheckpointStore(where).load()["params"]))
    after = meta_test(episodic, train(episodic)["params"], "test", TASKS, 0)
    assert after["accuracy"] - after["accuracy_ci95"] > 0.5, after
    with pytest.raises(ConfigError) as e:
        initial_model(with_values(episodic, {"model.width": 32}))
    assert e.value.problems == [f"model.init_from = '{where}': trained with model.width = 16, this run has 32"]


def test_the_logistic_probe_is_sklearn_s_logistic_regression():
    generator = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(25, 16, generator=generator), dim=1)
    y = torch.arange(5).repeat_interleave(5)
    weight, bias = fit_logistic(z, y, 5)
    ours = torch.softmax(z @ weight.T + bias, 1).numpy()
    theirs = LogisticRegression(C=1.0, tol=1e-8, max_iter=1000).fit(z.numpy(), y.numpy()).predict_proba(z.numpy())
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_bad_pretrain_values_exit_2_naming_each_field(cifar10_source):
    result = subprocess.run(
        [sys.executable, "-m", "platform.train", "--config", PRESET, f"task.data={cifar10_source}",
         "pretrain.batch_size=0", "pretrain.probe=svm", "pretrain.momentum=1"],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {PRESET}: pretrain.batch_size = 0: Input should be greater than 0",
        f"error: {PRESET}: pretrain.momentum = 1: Input should be less than 1",
        f"error: {PRESET}: pretrain.probe = 'svm': Input should be 'logistic' or 'centroid'",
    ]


def test_cross_field_rules(cifar10_source):
    with pytest.raises(ConfigError) as e:
        load_config(PRESET, [f"task.data={cifar10_source}", "resources.workers=3"])
    rule = "each Ray Train worker takes batch_size / workers images a step"
    assert e.value.problems == [
        f"{PRESET}: pretrain.batch_size = 64: must split equally over resources.workers = 3 ({rule})"
    ]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm=pretrain"])
    assert e.value.problems == [
        "config: algorithm = 'pretrain': pre-training a classifier needs a classification task, not sinusoid"
    ]


def test_a_sweep_of_pretrain_is_refused_before_anything_starts(cifar10_source):
    from platform.tune import sweep_problems

    config = load_config(PRESET, [f"task.data={cifar10_source}"])
    options = SimpleNamespace(search="random", scheduler="asha")
    (problem,) = sweep_problems(config, options)
    assert problem.startswith("algorithm = 'pretrain': no sweeps of pretrain yet") and "platform.train" in problem


def test_a_lost_worker_is_restarted_but_our_own_error_in_a_worker_is_a_bug():
    """What fit() raised, as Ray Train 2 reports it: a failed health check (the SIGKILL in the test above)
    is Ray's own error, restarted; an exception of our code in a worker (here a ValueError) is not."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from platform.pretrain import describe, lost_workers

    health = WorkerHealthCheckFailedError("A worker health check failed.", RuntimeError("actor died"))
    peer = RuntimeError("Connection closed by peer")  # what the surviving worker's all-reduce says
    lost = WorkerGroupError("Training failed due to worker errors:", {0: peer, 1: health})
    assert (
        lost_workers(lost) and describe(lost) == "worker 1: WorkerHealthCheckFailedError: A worker health check failed."
    )
    bug = WorkerGroupError("Training failed due to worker errors:", {1: ValueError("a bug")})
    assert not lost_workers(bug) and describe(bug) == "worker 1: ValueError: a bug"


def test_a_pretraining_step_draws_its_dropblock_masks_from_seed_step_and_rank(cifar10_source):
    """model.dropblock in pre-training: each worker's masks of a step come from (seed, step, rank), so a
    step is reproducible (resumes stay exact) and differs from the same step without masks."""
    from platform.models import drawing_masks
    from platform.pretrain import mask_seed, sgd_step

    base = [f"task.data={cifar10_source}", "task.image_size=16", "model.kind=resnet12", "model.width=2"]

    def one_step(dropblock: float, rank: int) -> torch.Tensor:  # rank: whose masks (and share of the batch)
        config = load_config(PRESET, [*base, f"model.dropblock={dropblock}"])
        data = training_images(config)
        model = classifier(config, data.classes)
        optimizer = make_sgd(config, model.parameters())
        x, y = shard(config, data, 0, rank, 2)
        with drawing_masks(model, mask_seed(config.seed, 0, rank), torch.device("cpu")):
            sgd_step(config, model, optimizer, x, y, 0)
        assert not model.training  # back in eval mode: meta-validation draws no masks
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    masked = one_step(0.3, rank=0)
    assert torch.equal(one_step(0.3, rank=0), masked)
    assert not torch.equal(one_step(0.0, rank=0), masked)
    assert mask_seed(0, 0, 0) != mask_seed(0, 0, 1) != mask_seed(0, 1, 0)
