"""Short, honest learning checks through the real commands: train on the shared cluster, then meta-test."""

import re
import subprocess
import sys

import matplotlib.image


def evaluate(ray_cluster, checkpoint_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "platform.evaluate", "--checkpoint", str(checkpoint_dir), *args],
        check=False, env=ray_cluster.subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def train_then_evaluate(ray_cluster, checkpoint_dir, overrides: list[str], tasks: int, *args: str) -> str:
    env = ray_cluster.subprocess_env()
    train = subprocess.run(
        [sys.executable, "-m", "platform.train", *overrides, "eval.every=0", f"checkpoint.dir={checkpoint_dir}"],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout + train.stderr
    result = evaluate(ray_cluster, checkpoint_dir, "--tasks", str(tasks), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sinusoid_maml_adapts_in_one_step(ray_cluster, tmp_path):
    picture = tmp_path / "adaptation.png"
    out = train_then_evaluate(
        ray_cluster,
        tmp_path / "run",
        ["--config", "configs/sinusoid.yaml", "optim.iterations=700", "optim.test_inner_steps=1"],
        300,
        "--plot",
        str(picture),
    )
    mse, ci, before = map(float, re.search(r"mse ([\d.]+) ± ([\d.]+) \(before adaptation ([\d.]+)\)", out).groups())
    # After one inner step the error must be far below the unadapted model's, beyond the noise.
    assert mse + ci < 0.75 * before, out
    assert f"adaptation picture: {picture}" in out
    pixels = matplotlib.image.imread(picture)
    assert pixels.shape[:2] == (400, 600) and pixels.std() > 0.05  # a 6x4-inch figure at 100 dpi, not blank


def test_omniglot_protonet_beats_chance_on_held_out_characters(ray_cluster, tmp_path):
    out = train_then_evaluate(
        ray_cluster,
        tmp_path,
        ["--config", "configs/omniglot-5w1s.yaml", "algorithm=protonet", "model.width=32"]
        + ["optim.iterations=40", "optim.meta_batch=8", "optim.chunk=4"],
        100,
    )
    accuracy, ci = map(float, re.search(r"accuracy ([\d.]+) ± ([\d.]+)", out).groups())
    assert "test split" in out
    assert accuracy - ci > 0.6, out  # chance is 0.2
    # The adaptation picture is a regression figure: asked of this run, it is refused before evaluating.
    refused = evaluate(ray_cluster, tmp_path, "--plot", str(tmp_path / "missing" / "a.jpg"))
    assert refused.returncode == 2 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines() == [
        f"error: --plot {tmp_path}/missing/a.jpg: the adaptation picture is for regression; this run classifies (omniglot)",
        f"error: --plot {tmp_path}/missing/a.jpg: must end in .png",
        f"error: --plot {tmp_path}/missing/a.jpg: folder {tmp_path}/missing does not exist",
    ]
