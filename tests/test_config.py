"""Run configuration: loading, overrides, validation messages, and the exit-2 path of the commands.

Most cases call `load_config` in this process; a few start `python -m platform.train` / `platform.evaluate`
(only with bad input, so no Ray cluster is started) to show the exit code, the stderr lines and that no
traceback is printed.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from benchmark_files import preset_data
from PIL import Image

from platform.cli import USAGE_ERROR, run
from platform.config import ConfigError, RunConfig, _dotted_keys, check, load_config, redact

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
OMNIGLOT = ["task.kind=omniglot", "model.kind=conv4"]


def problems_of(path=None, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    assert info.value.problems, "a ConfigError must carry at least one problem"
    assert all("\n" not in p for p in info.value.problems), "one line per problem"
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_folder(root: Path, classes: int, images: int) -> Path:
    """A tiny image-folder dataset: root/<class>/<image>.png, 8x8 grayscale."""
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(images):
            Image.new("L", (8, 8), color=(c * 7 + i) % 256).save(root / f"class{c:02d}" / f"{i}.png")
    return root


# ---- valid configs ----------------------------------------------------------------------------


def test_no_argument_default_config_is_valid():
    config = load_config()
    assert config == RunConfig()
    assert check(config) == []


@pytest.mark.parametrize("preset", [None, *PRESETS], ids=lambda p: "defaults" if p is None else p.name)
def test_resolved_config_is_complete_rerunnable_yaml(preset, benchmark_stand_ins, tmp_path):
    config = load_config(preset, preset_data(preset, benchmark_stand_ins) if preset else [])
    text = config.to_yaml()
    data = yaml.safe_load(text)
    flat = {f"{section}.{k}" for section, v in data.items() if isinstance(v, dict) for k in v}
    flat |= {k for k, v in data.items() if not isinstance(v, dict)}
    assert flat == set(_dotted_keys(RunConfig)), "every field is printed"
    again = load_config(write(tmp_path / "resolved.yaml", text))
    assert again == config
    assert again.to_yaml() == text


def test_round_trip_keeps_strings_that_look_like_numbers(tmp_path):
    config = load_config(None, ["checkpoint.dir=2024", "task.data=1e-3"])
    assert config.checkpoint.dir == "2024"
    assert load_config(write(tmp_path / "r.yaml", config.to_yaml())) == config


# ---- overrides ----------------------------------------------------------------------------------


def test_overrides_parse_yaml_scalars():
    config = load_config(
        None,
        [
            "optim.inner_steps=3",
            "optim.outer_lr=1e-3",
            "optim.inner_lr=5E-1",
            "optim.grad_clip=2.5",
            "optim.first_order=true",
            "checkpoint.resume=yes",
            "seed=7",
        ],
    )
    assert config.optim.inner_steps == 3 and isinstance(config.optim.inner_steps, int)
    assert config.optim.outer_lr == pytest.approx(0.001)
    assert config.optim.inner_lr == pytest.approx(0.5)
    assert config.optim.grad_clip == 2.5
    assert config.optim.first_order is True and config.checkpoint.resume is True
    assert config.seed == 7


def test_override_null_and_precedence_over_file(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {grad_clip: 1.0, outer_lr: 1e-4}\ntask: {data: somewhere}\n")
    assert load_config(path).optim.outer_lr == pytest.approx(1e-4)  # 1e-4 in a file is a float too
    config = load_config(path, ["optim.grad_clip=null", "task.data=~", "optim.outer_lr=0.01"])
    assert config.optim.grad_clip is None and config.task.data is None
    assert config.optim.outer_lr == 0.01


def test_override_sets_one_entry_of_a_mapping_as_a_string(tmp_path):
    path = write(tmp_path / "c.yaml", "tracking: {tags: {team: vision}}\n")
    config = load_config(path, ["tracking.tags.pipeline_run=0123", "tracking.tags.note=a=b"])
    assert config.tracking.tags == {"team": "vision", "pipeline_run": "0123", "note": "a=b"}
    (problem,) = problems_of(None, ["optim.inner_lr.x=1"])  # not a mapping
    assert "unknown key 'optim.inner_lr.x'" in problem


def test_unknown_override_key_suggests_closest_name():
    (problem,) = problems_of(None, ["optim.iner_lr=0.1"])
    assert "optim.iner_lr" in problem and "did you mean 'optim.inner_lr'" in problem


@pytest.mark.parametrize("override", ["optim", "optim.inner_lr", "optim=3", "optim={inner_lr: 0.1}", "=1"])
def test_override_without_key_value_or_of_a_whole_section_is_an_error(override):
    (problem,) = problems_of(None, [override])
    assert f"override '{override}'" in problem


def test_unknown_key_in_file_suggests_closest_name(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  inner_lr: 0.1\n  outer_lrr: 0.01\n")
    (problem,) = problems_of(path)
    assert str(path) in problem and "optim.outer_lrr" in problem and "optim.outer_lr'" in problem


# ---- field rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, field, value, rule",
    [
        ("algorithm=mamll", "algorithm", "'mamll'", "maml"),
        ("task.kind=imagenet", "task.kind", "'imagenet'", "omniglot"),
        ("optim.inner_lr=0", "optim.inner_lr", "0", "greater than 0"),
        ("optim.inner_lr=-0.1", "optim.inner_lr", "-0.1", "greater than 0"),
        ("optim.outer_lr=-1e-3", "optim.outer_lr", "-0.001", "greater than 0"),
        ("optim.outer_lr=0.0", "optim.outer_lr", "0.0", "greater than 0"),
        ("task.ways=1.5", "task.ways", "1.5", "integer"),
        ("seed=abc", "seed", "'abc'", "integer"),
    ],
)
def test_bad_field_names_field_value_and_rule(override, field, value, rule):
    (problem,) = problems_of(None, [override])
    assert f"{field} = {value}" in problem and rule in problem


# Values each field accepted on its own that crashed later (in torch, Optuna or Ray, after the cluster started).
@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["seed=18446744073709551616"],
            "seed = 18446744073709551616: Input should be less than or equal to 4294967295",
        ),
        (["seed=4294967296"], "seed = 4294967296: Input should be less than or equal to 4294967295"),
        (
            ["optim.meta_batch=8", "optim.chunk=9", "resources.workers=1"],
            "optim.chunk = 9: more than optim.meta_batch = 8",
        ),
        (
            ["resources.cpus_per_worker=0.00001"],
            "resources.cpus_per_worker = 1e-05: Input should be greater than or equal",
        ),
        (["resources.gpus_per_worker=0.00001"], "resources.gpus_per_worker = 1e-05: 0 or at least 0.0001"),
    ],
)
def test_values_that_would_crash_later_are_rejected(overrides, needle):
    (problem,) = problems_of(None, overrides)
    assert needle in problem


def test_largest_seed_is_valid():
    assert load_config(None, ["seed=4294967295"]).seed == 2**32 - 1


def test_omniglot_ways_larger_than_split_classes():
    # standard split: 172 validation characters x 4 rotations = 688 classes; background: 100 x 4 = 400
    (problem,) = problems_of(None, [*OMNIGLOT, "task.ways=689"])
    assert "task.ways = 689" in problem and "688 classes" in problem and "val split" in problem
    (problem,) = problems_of(None, [*OMNIGLOT, "task.split=background", "task.ways=401"])
    assert "task.ways = 401" in problem and "400 classes" in problem
    assert load_config(None, [*OMNIGLOT, "task.ways=688"]).task.ways == 688


def test_omniglot_shots_plus_query_beyond_20_drawings():
    (problem,) = problems_of(None, [*OMNIGLOT, "task.shots=5", "task.query=16"])
    assert "task.shots + task.query = 5 + 16" in problem and "20 images" in problem
    assert load_config(None, [*OMNIGLOT, "task.shots=5", "task.query=15"]).task.query == 15


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["task.kind=omniglot"], "model.kind = 'mlp'"),
        (["model.kind=conv4"], "model.kind = 'conv4'"),
        (["algorithm=protonet"], "algorithm = 'protonet'"),
    ],
)
def test_model_and_algorithm_must_fit_the_task(overrides, needle):
    (problem,) = problems_of(None, overrides)
    assert needle in problem


@pytest.mark.parametrize(
    "overrides, problems",
    [
        (["task.channels=3"], ["task.channels = 3: Omniglot is grayscale; use task.channels 1"]),
        (["task.channels=2"], ["task.channels = 2: Input should be 1 or 3"]),
        (["task.mean=[0.5]"], ["task.mean = [0.5]: needs task.std too (or neither)"]),
        (
            ["task.mean=[0.5, 0.5, 0.5]", "task.std=[0.2, 0.2, 0.2]"],
            [
                "task.mean = [0.5, 0.5, 0.5]: one value per channel (task.channels = 1)",
                "task.std = [0.2, 0.2, 0.2]: one value per channel (task.channels = 1)",
            ],
        ),
        (["task.mean=[0.5]", "task.std=[0]"], ["task.std = [0.0]: every value must be > 0"]),
        (
            ["task.image_size=12"],
            ["task.image_size = 12: model.kind 'conv4' halves the image 4 times; give at least 16"],
        ),
        (["task.crop_padding=-1"], ["task.crop_padding = -1: Input should be greater than or equal to 0"]),
    ],
)
def test_image_format_and_normalisation_are_checked(overrides, problems):
    assert problems_of(None, [*OMNIGLOT, *overrides]) == [f"config: {p}" for p in problems]


def test_image_settings_load_back_from_the_resolved_config():
    overrides = ["task.image_size=84", "task.mean=[0.4]", "task.std=[0.25]", "task.crop_padding=8", "task.flip=true"]
    config = load_config(None, [*OMNIGLOT, *overrides])
    assert (config.task.image_format.shape, config.task.mean, config.task.std) == ((1, 84, 84), (0.4,), (0.25,))
    assert RunConfig.model_validate(yaml.safe_load(config.to_yaml())) == config


def test_more_workers_than_gradient_chunks():
    (problem,) = problems_of(None, ["optim.meta_batch=8", "optim.chunk=4", "resources.workers=3"])
    assert "resources.workers = 3" in problem and "2 gradient chunks" in problem
    assert load_config(None, ["optim.meta_batch=8", "optim.chunk=4", "resources.workers=2"])
    (problem,) = problems_of(None, ["optim.meta_batch=2", "resources.workers=3"])  # chunk auto: one per worker
    assert "resources.workers = 3: more workers than the 2 tasks of a meta-batch" in problem, problem
    for bad, shown in [("0", "0"), ("-1", "-1"), ("many", "'many'"), ("2.5", "2.5")]:
        assert problems_of(None, [f"optim.chunk={bad}"]) == [
            f"config: optim.chunk = {shown}: a number of tasks (a whole number > 0) or 'auto'"
        ]


@pytest.mark.parametrize("algorithm", ["reptile", "protonet"])
def test_vmap_only_for_algorithms_that_have_it(algorithm):
    (problem,) = problems_of(None, [*OMNIGLOT, f"algorithm={algorithm}", "resources.vectorize=vmap"])
    assert "resources.vectorize = 'vmap'" in problem and repr(algorithm) in problem and "'loop'" in problem
    assert load_config(None, [*OMNIGLOT, f"algorithm={algorithm}", "resources.vectorize=auto"])
    assert load_config(None, [*OMNIGLOT, "algorithm=anil", "resources.vectorize=vmap"])


def test_several_problems_are_all_reported(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {inner_lr: 0, outer_lr: -1}\nalgorithm: nope\n")
    problems = problems_of(path, ["optim.iner_lr=0.1", "task.wayz=3"])
    assert len(problems) == 5
    for needle in ("optim.iner_lr", "task.wayz", "optim.inner_lr = 0", "optim.outer_lr = -1", "algorithm = 'nope'"):
        assert sum(needle in p for p in problems) == 1, needle
    # rules across fields are all reported too
    problems = problems_of(
        None, [*OMNIGLOT, "task.ways=1000", "task.shots=10", "task.query=11", "optim.chunk=4", "resources.workers=9"]
    )
    assert [p.split(":")[1].split("=")[0].strip() for p in problems] == [
        "task.ways",
        "task.shots + task.query",
        "resources.workers",
    ]


# ---- files --------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "seed: 0\noptim:\n  inner_lr: 0.1\n   outer_lr: 0.01\n")
    (problem,) = problems_of(path)
    assert str(path) in problem and "YAML syntax error" in problem and "line 4" in problem


@pytest.mark.parametrize("text, needle", [("- a\n- b\n", "mapping"), ("optim: 3\n", "optim = 3")])
def test_file_of_the_wrong_shape(tmp_path, text, needle):
    (problem,) = problems_of(write(tmp_path / "c.yaml", text))
    assert needle in problem


def test_missing_config_file(tmp_path):
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in problem and "cannot read" in problem


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "# nothing\n")) == RunConfig()


# ---- task.kind folder ---------------------------------------------------------------------------


def test_folder_missing_names_task_data_and_path(tmp_path):
    missing = tmp_path / "no-such-dataset"
    (problem,) = problems_of(None, ["task.kind=folder", "model.kind=conv4", f"task.data={missing}"])
    assert "task.data" in problem and str(missing) in problem
    (problem,) = problems_of(None, ["task.kind=folder", "model.kind=conv4"])
    assert "task.data" in problem


def test_folder_ways_and_images_checked_against_the_folder(tmp_path):
    # 20 classes -> 3 test, 3 validation, 14 training classes; 4 images each
    root = make_folder(tmp_path / "data", classes=20, images=4)
    base = ["task.kind=folder", "model.kind=conv4", f"task.data={root}"]
    assert load_config(None, [*base, "task.ways=3", "task.shots=1", "task.query=3"]).task.ways == 3
    problems = problems_of(None, [*base, "task.ways=4", "task.shots=2", "task.query=3"])
    assert len(problems) == 2
    assert "task.ways = 4" in problems[0] and "3 classes of the folder val split" in problems[0]
    assert "task.shots + task.query = 2 + 3" in problems[1] and "4 images" in problems[1]


@pytest.mark.parametrize("classes", [1, 2])
def test_folder_with_fewer_classes_than_splits(tmp_path, classes):
    root = make_folder(tmp_path / "data", classes=classes, images=4)
    (problem,) = problems_of(None, ["task.kind=folder", "model.kind=conv4", f"task.data={root}", "task.ways=1"])
    assert f"task.data = '{root}'" in problem and f"{classes} class folder(s)" in problem and "at least 3" in problem
    assert load_config(
        None,
        [
            "task.kind=folder",
            "model.kind=conv4",
            f"task.data={make_folder(tmp_path / 'three', 3, 4)}",
            "task.ways=1",
            "task.shots=1",
            "task.query=1",
        ],
    )


# ---- the Omniglot source, checked before anything starts ----------------------------------------


@pytest.mark.parametrize(
    "data, needle",
    [
        ("{tmp}/absent", "{tmp}/absent: Omniglot source folder not found"),
        ("{tmp}/half", "{tmp}/half/images_evaluation.zip not found"),
        ("s3://Not_A_Bucket/omniglot", "not a well-formed s3:// URI"),
        ("s3:///omniglot", "not a well-formed s3:// URI"),
        ("https://", "not a well-formed https URL"),
        ("https://host:port/omniglot", "not a well-formed https URL"),
        ("ftp://host/omniglot", "unsupported scheme 'ftp'"),
    ],
)
def test_omniglot_source_is_checked(tmp_path, data, needle):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images_background.zip").write_bytes(b"")
    data, needle = data.format(tmp=tmp_path), needle.format(tmp=tmp_path)
    (problem,) = problems_of(None, [*OMNIGLOT, f"task.data={data}"])
    assert problem.startswith(f"config: task.data = {data!r}: ") and needle in problem


def test_omniglot_default_source_is_checked_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPLATFORM_OMNIGLOT", str(tmp_path / "nowhere"))
    (problem,) = problems_of(None, OMNIGLOT)
    assert f"task.data = None (so '{tmp_path / 'nowhere'}': $METAPLATFORM_OMNIGLOT" in problem
    assert "Omniglot source folder not found" in problem


def test_omniglot_sources_that_pass_without_the_network(tmp_path, omniglot_source):
    extracted = tmp_path / "extracted"
    for part in ("background", "evaluation"):
        (extracted / f"images_{part}").mkdir(parents=True)
    for data in (omniglot_source, str(extracted), "https://omniglot.invalid/python", "http://127.0.0.1:9/x"):
        assert load_config(None, [*OMNIGLOT, f"task.data={data}"]).task.data == data


def test_omniglot_s3_objects_are_checked_when_credentials_are_at_hand(s3_bucket, monkeypatch):
    import boto3

    (problem,) = problems_of(None, [*OMNIGLOT, f"task.data=s3://{s3_bucket}/omniglot"])
    assert f"s3://{s3_bucket}/omniglot/images_background.zip: no such object" in problem
    for part in ("background", "evaluation"):
        boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"omniglot/images_{part}.zip", Body=b"zip")
    assert load_config(None, [*OMNIGLOT, f"task.data=s3://{s3_bucket}/omniglot"])
    # Without credentials the driver cannot tell (the workers may have them): not checked.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert load_config(None, [*OMNIGLOT, f"task.data=s3://{s3_bucket}/elsewhere"])


def test_checking_a_config_needs_neither_torch_nor_the_task_module(tmp_path):
    """config -> splits -> data: no import cycle with tasks, and a check that reads no image stays fast."""
    script = (
        "import sys; from platform.config import load_config; "
        f"load_config(None, ['task.kind=folder', 'model.kind=conv4', 'task.data={make_folder(tmp_path / 'd', 5, 3)}', "
        "'task.ways=1', 'task.shots=1', 'task.query=1']); load_config(None, ['task.kind=omniglot', 'model.kind=conv4']); "
        "print(sorted(m for m in ('torch', 'platform.tasks') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["config", "splits", "tasks", "data", "streams"])
def test_no_import_inside_a_function_without_a_reason(module):
    """The house rule: an import inside a function says why, in a comment on it or on the first of its group."""
    path = REPO / "platform" / f"{module}.py"
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    i = inner.lineno - 1
                    while "#" not in lines[i] and lines[i - 1].strip().startswith(("import ", "from ")):
                        i -= 1  # an import right after another: the group's reason covers it
                    assert "#" in lines[i], f"{path.name}:{inner.lineno}: import inside {node.name}() without a reason"


# ---- passwords in URLs are not shown -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("postgresql://mlflow:s3cr3t@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("https://user:p@ss:w@host/omniglot", "https://user:***@host/omniglot"),  # up to the last @ of the netloc
        ("https://user@host/x", "https://user@host/x"),  # no password
        ("https://host:8443/x?a=b", "https://host:8443/x?a=b"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("see http://a:b@h1/ and http://c:d@h2", "see http://a:***@h1/ and http://c:***@h2"),
        ("/data/omniglot", "/data/omniglot"),
    ],
)
def test_redact_hides_the_password_of_every_url(text, shown):
    assert redact(text) == shown


def test_resolved_config_hides_passwords_unless_asked():
    secret = ["tracking.uri=postgresql://u:hunter2@db/mlflow", "tracking.tags.source=https://bot:tok3n@git.example/r"]
    config = load_config(None, secret)
    for text in (config.to_yaml(), yaml.safe_dump(config.redacted())):
        assert "hunter2" not in text and "tok3n" not in text
        assert "postgresql://u:***@db/mlflow" in text and "https://bot:***@git.example/r" in text
    assert config.redacted()["tracking"]["uri"] == "postgresql://u:***@db/mlflow"
    assert config.tracking.uri == "postgresql://u:hunter2@db/mlflow"  # the config itself keeps it
    assert "hunter2" in config.to_yaml(redact=False)


# ---- commands: exit code 2, one line per problem, no traceback ---------------------------------


def test_cli_run_turns_config_errors_into_exit_2(capsys):
    def main():
        raise ConfigError(["first problem", "second problem"])

    with pytest.raises(SystemExit) as info:
        run(main)
    assert info.value.code == USAGE_ERROR
    assert capsys.readouterr().err == "error: first problem\nerror: second problem\n"
    with pytest.raises(SystemExit) as info:
        run(lambda: 0)
    assert info.value.code == 0


def python_m(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


BAD_COMMANDS = {
    "yaml-syntax": (["platform.train", "--config", "broken.yaml"], ["broken.yaml: YAML syntax error at line 3"]),
    "unknown-override": (["platform.train", "optim.iner_lr=0.1"], ["did you mean 'optim.inner_lr'"]),
    "several": (
        ["platform.train", "--config", "omniglot.yaml", "task.ways=2000", "resources.workers=99", "task.query=30"],
        ["task.ways = 2000", "task.shots + task.query = 1 + 30", "resources.workers = 99"],
    ),
    "section-override": (["platform.train", "optim"], ["override 'optim'"]),
    "folder-missing": (["platform.train", *OMNIGLOT[1:], "task.kind=folder", "task.data=missing"], ["task.data"]),
    # Before Ray starts: this took 100 s of failing actors and exit 1 when only the actors looked.
    "omniglot-data-missing": (
        ["platform.train", "--config", "omniglot.yaml", "task.data=/nonexistent"],
        ["task.data = '/nonexistent': /nonexistent: Omniglot source folder not found"],
    ),
    "evaluate-missing-checkpoint": (["platform.evaluate", "--checkpoint", "/nonexistent"], ["/nonexistent"]),
}


@pytest.mark.parametrize("name", BAD_COMMANDS)
def test_bad_input_exits_2_with_one_line_per_problem(name, tmp_path):
    write(tmp_path / "broken.yaml", "seed: 0\ntask: {kind: omniglot\nalgorithm: maml\n")
    write(tmp_path / "omniglot.yaml", (REPO / "configs" / "omniglot-5w1s.yaml").read_text())
    args, needles = BAD_COMMANDS[name]
    result = python_m(args, tmp_path)
    assert result.returncode == USAGE_ERROR, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(needles) and all(line.startswith("error: ") for line in lines), result.stderr
    for line, needle in zip(lines, needles):
        assert needle in line


def test_train_help(tmp_path):
    result = python_m(["platform.train", "--help"], tmp_path)
    assert result.returncode == 0 and "--config" in result.stdout and "key=value" in result.stdout


def test_test_time_settings_of_evaluate():
    from platform.metatest import test_time_config

    base = load_config(None)  # sinusoid, K = 10, 10 query
    assert test_time_config(base, None, None, None) == (base, "")
    config, name = test_time_config(base, None, 5, None)
    assert config.task.shots == 5 and name == "k5q10"
    assert test_time_config(base, None, 10, 10)[1] == ""  # the run's own setting
    with pytest.raises(ConfigError) as e:
        test_time_config(base, 20, None, None)
    assert e.value.problems == [
        "--ways 20: a maml model's classifier head has 5 outputs (trained 5-way); only protonet and pretrain evaluate other ways"
    ]
    with pytest.raises(ConfigError) as e:
        test_time_config(base, None, 0, None)
    assert "task.shots = 0" in e.value.problems[0]
