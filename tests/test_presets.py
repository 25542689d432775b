"""Every preset in configs/ stays runnable: it validates, trains a couple of iterations through the
engine, and meta-tests as docs/results.md says it is meta-tested."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import benchmark_files as bf
import pytest
import yaml

from platform.config import load_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
RESULTS = REPO / "docs" / "results.md"


def data_overrides(preset: Path, stand_ins: dict[str, Path], smoke: bool = False) -> list[str]:
    """What a preset needs here; smoke runs of the benchmark presets are at 16x16 (a ResNet-12 takes seconds
    per 84x84 task on a CPU; tests/test_published.py loads the layouts at their own sizes)."""
    shrink = smoke and yaml.safe_load(preset.read_text())["task"]["kind"] in stand_ins
    return [*bf.preset_data(preset, stand_ins), *(["task.image_size=16"] if shrink else [])]


# The presets' own settings, shrunk to the smallest run that still goes through every part:
# training, meta-validation, checkpoint, meta-test. One driver process runs them all (starting a
# driver per preset would cost more than the runs).
SMOKE = ["optim.iterations=2", "optim.meta_batch=2", "optim.chunk=1", "eval.every=2", "eval.tasks=2", "log_every=1"]
SCRIPT = """
import json, signal, sys
from pathlib import Path
from platform.config import RunConfig, load_config
from platform.metatest import meta_test, test_time_config
from platform.train import StopRequest, train

root, smoke, presets = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
for preset, data in presets:
    config = load_config(preset, [*smoke, *data, f"checkpoint.dir={root / Path(preset).stem}", "tracking.mlflow=false"])
    state = train(config)
    handler = signal.getsignal(signal.SIGTERM)  # Ray's own after ray.init; never the run's any more
    assert not isinstance(getattr(handler, "__self__", None), StopRequest), "train() left its handler installed"
    saved = RunConfig.model_validate(state["config"])  # the final checkpoint's, as evaluate reads it
    # Omniglot's ProtoNets are trained on 60-way episodes and tested on 5- and 20-way tasks, miniImageNet's
    # Conv4 ones on 15-way episodes and tested on 5-way tasks (docs/results.md).
    settings = [(5, 15), (20, 15)] if "omniglot-protonet" in preset else [(5, 15)] if saved.task.ways == 15 else [(None, None)]
    for ways, query in settings:
        tested, _ = test_time_config(saved, ways, None, query)
        result = meta_test(tested, state["params"], "test", 2, tested.optim.test_inner_steps)
        print("PRESET", json.dumps({"preset": preset, "iteration": state["iteration"], "ways": tested.task.ways,
                                    "val": state["history"][-1].get("val"), "test": result}), flush=True)
"""


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_says_what_it_reproduces(preset, benchmark_stand_ins):
    config = load_config(str(preset), data_overrides(preset, benchmark_stand_ins))
    assert preset.read_text().startswith("# "), f"{preset.name}: no comment saying what it reproduces"
    assert config.checkpoint.dir == f"checkpoints/{preset.stem}", "each preset checkpoints in its own folder"


def test_every_preset_is_in_the_results_doc():
    text = RESULTS.read_text()
    missing = [p.name for p in PRESETS if f"configs/{p.name}" not in text]
    assert not missing, f"docs/results.md does not say what these presets reproduce: {missing}"


def test_every_preset_trains_and_meta_tests(ray_cluster, benchmark_stand_ins, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(SMOKE), json.dumps([(str(p), data_overrides(p, benchmark_stand_ins, smoke=True)) for p in PRESETS])],
        check=False, cwd=REPO, env=ray_cluster.subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in re.findall(r"^PRESET (.*)$", result.stdout, re.MULTILINE)]
    assert {r["preset"] for r in rows} == set(map(str, PRESETS))
    for row in rows:
        assert row["iteration"] == 2 and row["val"] is not None, row
        score = row["test"]["accuracy"] if "accuracy" in row["test"] else row["test"]["loss"]
        assert row["test"]["tasks"] == 2 and math.isfinite(score), row
    assert sorted(r["ways"] for r in rows if "omniglot-protonet" in r["preset"]) == [5, 5, 20, 20]
