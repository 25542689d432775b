"""The adaptation API (platform/learner.py) and its command (`python -m platform.adapt`), on tiny models
trained in process on a generated folder data set (no Omniglot), stored with CheckpointStore."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from platform import adapt, evaluate
from platform.algorithms import build
from platform.checkpoint import CheckpointStore
from platform.config import RunConfig
from platform.data import load_image_folder
from platform.engine import EVAL_METRICS, AdaptationWorker, flatten
from platform.images import ImageFormat
from platform.learner import InputError, learner_from, load_images, load_learner
from platform.metatest import meta_test
from platform.tasks import evaluation_seeds, task_sampler

WAYS, STEPS, TASKS = 3, 2, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 classes x 4 images: each class a random 28x28 pattern, each image it with some pixels flipped."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(20):
        (root / f"c{c:02d}").mkdir()
        pattern = rng.random((28, 28)) > 0.7
        for i in range(4):
            pixels = np.where(pattern ^ (rng.random((28, 28)) > 0.9), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c:02d}" / f"{i}.png")
    return root


def folder_config(folder, algorithm: str, bn_stats: str = "batch") -> RunConfig:
    return RunConfig.model_validate(
        {
            "task": {"kind": "folder", "data": str(folder), "ways": WAYS, "shots": 1, "query": 2},
            "model": {"kind": "conv4", "width": 8, "bn_stats": bn_stats},
            "algorithm": algorithm,
            "optim": {"inner_lr": 0.4, "test_inner_steps": STEPS},
        }
    )


def trained(config: RunConfig, iterations: int = 3) -> dict:
    """A few meta-SGD steps on training tasks: a model that is neither untrained nor the same for every run."""
    _, algorithm, params = build(config)
    sampler = task_sampler(config.task, "train")
    for i in range(iterations):
        grads, _ = algorithm.outer_grad(params, [sampler.sample(4 * i + j) for j in range(4)])
        params = {k: (v - 0.05 * grads[k] / 4).detach() for k, v in params.items()}
    return params


def checkpoint(tmp_path, config: RunConfig, params: dict):
    CheckpointStore(tmp_path / "ck").save(
        {"params": params, "config": config.model_dump(mode="json"), "iteration": 3}, 3
    )
    return tmp_path / "ck"


@pytest.fixture
def worker_threads():
    """The thread count an AdaptationWorker (so meta_test) pins: resources.cpus_per_worker = 1; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def maml_model(folder, tmp_path_factory):
    """(checkpoint folder, config, params) of a tiny MAML model."""
    config = folder_config(folder, "maml")
    params = trained(config)
    return checkpoint(tmp_path_factory.mktemp("maml"), config, params), config, params


@pytest.mark.parametrize("bn_stats", ["batch", "support"])
@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd", "protonet"])
def test_adapting_held_out_tasks_through_the_api_scores_exactly_as_meta_test(
    folder, tmp_path, worker_threads, algorithm, bn_stats
):
    """The same computation: per task the same loss and accuracy bit for bit, and meta_test's mean accuracy
    (on the worker's thread count: torch's thread count can change floating-point summation order)."""
    config = folder_config(folder, algorithm, bn_stats)
    params = trained(config)
    learner = load_learner(checkpoint(tmp_path, config, params), bn_stats=bn_stats)
    sampler = task_sampler(config.task, "test")
    losses, accuracies = [], []
    for seed in evaluation_seeds(TASKS):
        task = sampler.sample(seed)
        adapted = learner.adapt(task.support_x, task.support_y)  # steps: the run's test_inner_steps
        predictions = adapted.predict(task.query_x)
        losses.append(F.cross_entropy(adapted.outputs(task.query_x), task.query_y).item())
        accuracies.append((torch.tensor(predictions.labels) == task.query_y).float().mean().item())
    rows = AdaptationWorker(config.model_dump(mode="json")).evaluate(
        flatten(params), "test", STEPS, evaluation_seeds(TASKS)
    )
    assert np.array_equal(np.float32(losses), rows[:, EVAL_METRICS.index("loss")])
    assert np.array_equal(np.float32(accuracies), rows[:, EVAL_METRICS.index("accuracy")])
    assert meta_test(config, params, "test", TASKS, STEPS)["accuracy"] == float(np.mean(np.float32(accuracies)))


def test_regression_predictions_score_exactly_as_meta_test(tmp_path, worker_threads):
    config = RunConfig.model_validate({"optim": {"test_inner_steps": 5}})
    params = trained(config)
    learner = load_learner(checkpoint(tmp_path, config, params))
    sampler = task_sampler(config.task, "test")
    losses = []
    for seed in evaluation_seeds(TASKS):
        task = sampler.sample(seed)
        values = learner.adapt(task.support_x, task.support_y).predict(task.query_x)
        assert values.shape == (len(task.query_x),)
        losses.append(F.mse_loss(torch.from_numpy(values).unsqueeze(1), task.query_y).item())
    assert meta_test(config, params, "test", TASKS, 5)["loss"] == float(np.mean(np.float32(losses)))


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_an_images_probabilities_are_the_same_alone_and_in_a_batch_of_50(folder, algorithm):
    """With support statistics (the API's default) to 1e-6, not bitwise: the kernels may block a batch of
    53 rows differently from one of 4. With batch statistics the other queries change the answer."""
    config = folder_config(folder, algorithm)
    params = trained(config)
    files = sorted(folder.glob("*/*.png"))
    support, queries = files[0:12:4], files[12:62]
    for bn_stats, same in (("support", True), ("batch", False)):
        adapted = learner_from(config, params, bn_stats).adapt(support, ["a", "b", "c"])
        alone = adapted.predict(queries[:1]).probabilities[0]
        together = adapted.predict(queries).probabilities[0]
        assert np.allclose(alone, together, rtol=0, atol=1e-6) == same, bn_stats


def test_labels_are_the_users_own_names(maml_model):
    _, config, params = maml_model
    task = task_sampler(config.task, "test").sample(0)
    learner = learner_from(config, params)
    by_index = learner.adapt(task.support_x, task.support_y).predict(task.query_x)
    names = ["ant", "bee", "cat"]  # sorted like 0, 1, 2: the same classes
    by_name = learner.adapt(task.support_x, [names[i] for i in task.support_y]).predict(task.query_x)
    assert by_index.classes == (0, 1, 2) and by_name.classes == ("ant", "bee", "cat")
    assert np.array_equal(by_name.probabilities, by_index.probabilities)
    assert by_name.labels == [names[i] for i in by_index.labels]
    order = torch.tensor([2, 0, 1])  # the support set in another order: the same model up to rounding
    shuffled = learner.adapt(task.support_x[order], [names[i] for i in task.support_y[order]]).predict(task.query_x)
    assert shuffled.classes == by_name.classes
    np.testing.assert_allclose(shuffled.probabilities, by_name.probabilities, atol=1e-6)
    assert learner.adapt(task.support_x, [30, 10, 20]).predict(task.query_x).classes == (10, 20, 30)


def test_fewer_labels_than_the_head_use_its_first_outputs(maml_model):
    """2 labels on a 3-way MAML model: exactly the 2-way model made of the head's first 2 rows."""
    _, config, params = maml_model
    task = task_sampler(config.task, "test").sample(1)
    two = task.support_y < 2
    predictions = learner_from(config, params).adapt(task.support_x[two], ["x", "y"]).predict(task.query_x)
    two_way = config.model_copy(update={"task": config.task.model_copy(update={"ways": 2})})
    head = {k: v[:2] for k, v in params.items() if k.startswith("head.")}
    expected = learner_from(two_way, params | head).adapt(task.support_x[two], ["x", "y"]).predict(task.query_x)
    assert predictions.probabilities.shape == (len(task.query_x), 2)
    assert np.array_equal(predictions.probabilities, expected.probabilities)


def test_more_labels_than_the_head_is_an_error_but_protonets_take_any_number(folder, maml_model):
    _, config, params = maml_model
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(InputError) as e:
        learner_from(config, params).adapt(x, ["a", "b", "c", "d"])
    assert e.value.problems == [
        "support_y: 4 labels, but this maml model's classifier head has 3 outputs (trained 3-way): give at most 3 labels"
    ]
    protonet = folder_config(folder, "protonet")
    predictions = learner_from(protonet, trained(protonet)).adapt(x, ["a", "b", "c", "d"]).predict(x)
    assert predictions.probabilities.shape == (4, 4) and predictions.labels == ["a", "b", "c", "d"]


def test_image_files_are_converted_exactly_as_the_training_data(tmp_path):
    """An RGB JPEG and a grayscale PNG with transparency, of other sizes: the pixels a folder data set
    trains on (platform.data's cache), divided by 255 as tasks.py does, in grayscale and in RGB."""
    (tmp_path / "c").mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "c" / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 50, 2), dtype=np.uint8), "LA").save(tmp_path / "c" / "b.png")
    files = [tmp_path / "c" / "a.jpg", tmp_path / "c" / "b.png"]
    for image_format in (ImageFormat(), ImageFormat(32, 3)):
        training = np.array(load_image_folder(tmp_path, image_format).images)
        ours = load_images(files, image_format)
        assert ours.shape == (2, *image_format.shape) and ours.dtype == torch.float32
        assert torch.equal(ours.reshape(training.shape), torch.from_numpy(training).float() / 255)


def test_bad_inputs_name_the_field(maml_model):
    _, config, params = maml_model
    learner = learner_from(config, params)
    x = torch.rand(3, 1, 28, 28)
    cases = {
        "support_y: 2 labels for 3 support examples": lambda: learner.adapt(x, ["a", "b"]),
        "support_y: label 1.5 (float)": lambda: learner.adapt(x, ["a", "b", 1.5]),
        "support_y: labels mix strings and integers": lambda: learner.adapt(x, ["a", "b", 1]),
        "support_x: examples have different shapes: (1, 28, 28) at 0, (1, 28, 27) at 1": lambda: learner.adapt(
            [np.zeros((1, 28, 28), np.float32), np.zeros((1, 28, 27), np.float32)], ["a", "b"]
        ),
        "support_x: examples of shape (3, 28, 28)": lambda: learner.adapt(torch.rand(3, 3, 28, 28), [0, 1, 2]),
        "support_x: dtype torch.uint8": lambda: learner.adapt(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), [0, 1, 2]),
        "steps = -1: must be an integer >= 0": lambda: learner.adapt(x, [0, 1, 2], steps=-1),
        "query_x: no examples": lambda: learner.adapt(x, [0, 1, 2]).predict(torch.zeros(0, 1, 28, 28)),
        "query_x: holds NaN": lambda: learner.adapt(x, [0, 1, 2]).predict(torch.full((1, 1, 28, 28), float("nan"))),
    }
    for expected, call in cases.items():
        with pytest.raises(InputError) as e:
            call()
        assert e.value.problems[0].startswith(expected), (expected, e.value.problems)


# --- the command ----------------------------------------------------------------------------------


def run_command(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """`python -m platform.adapt ARGV` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["platform.adapt", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        adapt.run(adapt.main)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture
def support_dir(folder, tmp_path):
    """support/<label>/<image>: 1 image each of 3 classes, labels named in an order of their own."""
    for name, c in (("zeta", 0), ("alpha", 1), ("mu", 2)):
        (tmp_path / "support" / name).mkdir(parents=True)
        (tmp_path / "support" / name / "0.png").write_bytes((folder / f"c{c:02d}" / "0.png").read_bytes())
    return tmp_path / "support"


def test_command_predicts_as_the_api_in_a_table_csv_and_json(
    monkeypatch, capsys, folder, maml_model, support_dir, tmp_path
):
    ck, _, _ = maml_model
    queries = [folder / "c00" / "1.png", folder / "c01" / "2.png", folder / "c02" / "3.png"]
    names = ["alpha", "mu", "zeta"]  # the command reads the label folders in sorted order
    adapted = load_learner(ck).adapt([support_dir / n / "0.png" for n in names], names)
    expected = adapted.predict(queries)
    given = ("--checkpoint", ck, "--support", support_dir, "--query")
    code, out, _ = run_command(monkeypatch, capsys, *given, *queries)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["file", "label", "p(alpha)", "p(mu)", "p(zeta)"] and len(lines) == 4
    assert [line.split()[1] for line in lines[1:]] == expected.labels
    code, out, _ = run_command(monkeypatch, capsys, *given, *queries, "--output", tmp_path / "p.csv")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert (
        code == 0
        and [r["file"] for r in rows] == list(map(str, queries))
        and [r["label"] for r in rows] == expected.labels
    )
    assert np.array_equal(
        [[float(r[f"p({c})"]) for c in expected.classes] for r in rows], expected.probabilities.astype(float)
    )
    run_command(monkeypatch, capsys, *given, folder / "c00", "--output", tmp_path / "p.json")
    objects = json.loads((tmp_path / "p.json").read_text())
    assert [o["file"] for o in objects] == [str(p) for p in sorted((folder / "c00").glob("*.png"))]
    expected = adapted.predict(sorted((folder / "c00").glob("*.png")))
    assert [o["label"] for o in objects] == expected.labels
    assert [[o["probabilities"][c] for c in names] for o in objects] == expected.probabilities.tolist()


def test_command_regression_from_csv_files(monkeypatch, capsys, tmp_path):
    config = RunConfig()
    params = trained(config)
    ck = checkpoint(tmp_path, config, params)
    task = task_sampler(config.task, "test").sample(0)
    (tmp_path / "s.csv").write_text(
        "x,y\n"
        + "".join(f"{x!r},{y!r}\n" for x, y in zip(task.support_x[:, 0].tolist(), task.support_y[:, 0].tolist()))
    )
    (tmp_path / "q.csv").write_text("".join(f"{x!r}\n" for x in task.query_x[:, 0].tolist()))
    code, _, _ = run_command(
        monkeypatch,
        capsys,
        "--checkpoint",
        ck,
        "--support",
        tmp_path / "s.csv",
        "--query",
        tmp_path / "q.csv",
        "--output",
        tmp_path / "p.json",
    )
    predicted = [o["y"] for o in json.loads((tmp_path / "p.json").read_text())]
    assert code == 0
    assert np.array_equal(
        np.float32(predicted), load_learner(ck).adapt(task.support_x, task.support_y).predict(task.query_x)
    )


def test_command_bad_input_exits_2_with_one_line_per_problem_and_writes_nothing(
    monkeypatch, capsys, maml_model, support_dir, tmp_path
):
    ck, _, _ = maml_model
    (support_dir / "empty").mkdir()
    (support_dir / "nu").mkdir()
    (support_dir / "nu" / "0.png").write_bytes((support_dir / "mu" / "0.png").read_bytes())
    (support_dir / "mu" / "1.png").write_bytes(b"not a png")
    (tmp_path / "queries").mkdir()
    output = tmp_path / "p.csv"
    code, out, err = run_command(
        monkeypatch,
        capsys,
        "--checkpoint",
        ck,
        "--support",
        support_dir,
        "--query",
        tmp_path / "queries",
        "--output",
        output,
    )
    lines = err.splitlines()
    assert code == 2 and out == "" and not output.exists() and not list(tmp_path.glob(".p.csv*"))
    assert all(line.startswith("error: ") for line in lines), err  # no traceback
    assert len(lines) == 4, err
    assert lines[0].startswith(f"error: --support {support_dir / 'empty'}: label folder holds no images")
    assert lines[1].startswith(f"error: --query {tmp_path / 'queries'}: holds no images")
    assert lines[2].startswith(
        f"error: --support {support_dir}: 4 labels, but this maml model's classifier head has 3 outputs"
    )
    assert lines[3].startswith(f"error: {support_dir / 'mu' / '1.png'}: cannot read the image")
    code, _, err = run_command(
        monkeypatch,
        capsys,
        "--checkpoint",
        ck,
        "--support",
        tmp_path,
        "--query",
        tmp_path,
        "--output",
        tmp_path / "p.txt",
    )
    assert code == 2 and err == f"error: --output {tmp_path / 'p.txt'}: must end in .csv or .json\n"


def test_command_bad_csv_for_a_regression_model(monkeypatch, capsys, tmp_path):
    config = RunConfig()
    ck = checkpoint(tmp_path, config, trained(config, 1))
    (tmp_path / "s.csv").write_text("x,y\n1,2\n3\n4,five\n")
    (tmp_path / "q.csv").write_text("x\n")
    code, _, err = run_command(
        monkeypatch, capsys, "--checkpoint", ck, "--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv"
    )
    assert code == 2
    assert err.splitlines() == [
        f"error: --support {tmp_path / 's.csv'} line 3: 1 values; expected 2 finite number(s)",
        f"error: --support {tmp_path / 's.csv'} line 4: '4,five' is not 2 number(s)",
        f"error: --query {tmp_path / 'q.csv'}: no rows; expected 1 comma-separated number(s) per line",
    ]


def test_the_command_runs_as_a_module(maml_model, support_dir, folder):
    ck, _, _ = maml_model
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "platform.adapt",
            "--checkpoint",
            ck,
            "--support",
            support_dir,
            "--query",
            folder / "c03",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 + 4  # header + one row per image of c03


def test_evaluate_bn_stats_chooses_the_normalisation(monkeypatch, capsys, maml_model):
    ck, config, params = maml_model
    for bn_stats in ("batch", "support"):
        expected = meta_test(
            config.model_copy(update={"model": config.model.model_copy(update={"bn_stats": bn_stats})}),
            params,
            "test",
            4,
            STEPS,
        )
        monkeypatch.setattr(
            sys, "argv", ["evaluate", "--checkpoint", str(ck), "--tasks", "4", "--bn-stats", bn_stats, "--no-mlflow"]
        )
        with pytest.raises(SystemExit):
            evaluate.run(evaluate.main)
        out = capsys.readouterr().out
        assert f"{bn_stats} statistics: accuracy {expected['accuracy']:.4f} ± {expected['accuracy_ci95']:.4f}" in out, (
            out
        )
