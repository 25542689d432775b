"""Short, honest learning checks through the real commands: train on the shared cluster, then meta-test."""

import re
import subprocess
import sys


def train_then_evaluate(ray_cluster, checkpoint_dir, overrides: list[str], tasks: int) -> str:
    env = ray_cluster.subprocess_env()
    train = subprocess.run(
        [sys.executable, "-m", "platform.train", *overrides, "eval.every=0", f"checkpoint.dir={checkpoint_dir}"],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout + train.stderr
    evaluate = subprocess.run(
        [sys.executable, "-m", "platform.evaluate", "--checkpoint", str(checkpoint_dir), "--tasks", str(tasks)],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr
    return evaluate.stdout


def test_sinusoid_maml_adapts_in_one_step(ray_cluster, tmp_path):
    out = train_then_evaluate(
        ray_cluster,
        tmp_path,
        ["--config", "configs/sinusoid.yaml", "optim.iterations=700", "optim.test_inner_steps=1"],
        300,
    )
    mse, ci, before = map(float, re.search(r"mse ([\d.]+) ± ([\d.]+) \(before adaptation ([\d.]+)\)", out).groups())
    # After one inner step the error must be far below the unadapted model's, beyond the noise.
    assert mse + ci < 0.75 * before, out


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
