"""The start-up hook (metaplatform_hook.py): `platform.train` and the standard `platform` module together.

Every check runs in a fresh interpreter, since the hook acts at interpreter start-up.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STDLIB_PLATFORM = os.path.join(sysconfig.get_path("stdlib"), "platform.py")
TIMEOUT = 300


def run_python(args, *, cwd, env=None, timeout=TIMEOUT):
    return subprocess.run(
        [PYTHON, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def clean_env():
    """os.environ without anything that points at a Ray cluster or adds to sys.path."""
    drop = {"PYTHONPATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.parametrize("where", ["tmp", "repo"])
def test_train_help(where, tmp_path):
    cwd = tmp_path if where == "tmp" else REPO
    result = run_python(["-m", "platform.train", "--help"], cwd=cwd, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_unrelated_platform_folder_in_cwd_is_ignored(tmp_path):
    """A `platform/` folder without train.py (the hook's marker) is not ours: none of its modules are used."""
    (tmp_path / "platform").mkdir()
    # platform.train imports platform.cli: this one would win if the folder were taken for ours.
    (tmp_path / "platform" / "cli.py").write_text("raise SystemExit('wrong platform folder')\n")
    result = run_python(["-m", "platform.train", "--help"], cwd=tmp_path, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_stdlib_platform_still_works_after_import(tmp_path):
    probe = textwrap.dedent(
        """
        import json, platform, platform.train
        print(json.dumps({
            "file": platform.__file__,
            "train_file": platform.train.__file__,
            "values": [platform.system(), platform.python_version(), platform.machine()],
        }))
        """
    )
    result = run_python(["-c", probe], cwd=tmp_path, env=clean_env())
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])

    # The same interpreter without site (-S: no .pth files, so no hook) gives the reference values.
    values = "[platform.system(), platform.python_version(), platform.machine()]"
    reference = run_python(
        ["-S", "-c", f"import json, platform; print(json.dumps({values}))"],
        cwd=tmp_path,
        env=clean_env(),
    )
    assert reference.returncode == 0, reference.stderr
    assert seen["values"] == json.loads(reference.stdout)
    assert all(seen["values"])
    assert seen["values"][1] == "{}.{}.{}".format(*sys.version_info[:3])
    assert os.path.samefile(seen["file"], STDLIB_PLATFORM)
    assert os.path.samefile(seen["train_file"], REPO / "platform" / "train.py")


@pytest.fixture
def marked_working_dir(tmp_path):
    """A copy of the project's code with one extra module, platform/_marker.py, holding a fresh value."""
    assert not (REPO / "platform" / "_marker.py").exists()
    working_dir = tmp_path / "working_dir"
    shutil.copytree(REPO / "platform", working_dir / "platform", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", working_dir)
    marker = uuid.uuid4().hex
    (working_dir / "platform" / "_marker.py").write_text(f"MARK = {marker!r}\n")
    return working_dir, marker


def test_ray_worker_runs_the_working_dir_code(ray_cluster, marked_working_dir, tmp_path):
    """A task of a job with runtime_env working_dir imports our package from that dir, and sees the stdlib module."""
    working_dir, marker = marked_working_dir
    driver = textwrap.dedent(
        f"""
        import json, ray

        # A local directory is only accepted in the job-level runtime_env (ray.init), not in .options().
        ray.init(
            address={ray_cluster.address!r},
            runtime_env={{"working_dir": {str(working_dir)!r}}},
            logging_level="WARNING",
        )

        @ray.remote(num_cpus=1)
        def probe():
            import os, platform
            import platform._marker, platform.train
            return {{
                "system": platform.system(),
                "python_version": platform.python_version(),
                "platform_file": platform.__file__,
                "marker": platform._marker.MARK,
                "marker_file": platform._marker.__file__,
                "train_file": platform.train.__file__,
                "cwd": os.getcwd(),
            }}

        print(json.dumps(ray.get(probe.remote(), timeout=240)))
        """
    )
    result = run_python(["-c", driver], cwd=tmp_path, env=ray_cluster.subprocess_env(clean_env()))
    assert result.returncode == 0, result.stderr[-5000:]
    seen = json.loads(result.stdout.splitlines()[-1])

    assert seen["marker"] == marker
    ours = Path(seen["marker_file"]).parent
    assert ours.parent == Path(seen["cwd"])  # the unpacked working dir, not the repo
    assert Path(seen["train_file"]).parent == ours
    assert REPO not in ours.parents
    assert os.path.samefile(seen["platform_file"], STDLIB_PLATFORM)
    assert seen["system"] == __import__("platform").system()
    assert seen["python_version"] == "{}.{}.{}".format(*sys.version_info[:3])


def test_ray_job_runs_the_working_dir_code(ray_cluster, marked_working_dir, tmp_path):
    """`ray job submit --working-dir`: the entrypoint (plain `python`) imports our package from that dir."""
    working_dir, marker = marked_working_dir
    entrypoint = (
        "import json, os, platform, platform._marker as m; "
        "print(json.dumps([platform.system(), m.MARK, m.__file__, os.getcwd()]))"
    )
    ray = str(Path(PYTHON).parent / "ray")
    submit = [ray, "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(working_dir)]
    # Plain `python`: a job entrypoint finds it on the PATH of `ray start`, which must be this venv's.
    entry = ["--", "python", "-c", entrypoint]
    result = subprocess.run(
        [*submit, "--log-style", "record", "--log-color", "false", *entry],
        check=False,
        cwd=tmp_path,
        env=ray_cluster.subprocess_env(clean_env()),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("[") and marker in l)
    system, seen_marker, marker_file, cwd = json.loads(line)
    assert seen_marker == marker
    assert Path(marker_file).parent.parent == Path(cwd)
    assert system == __import__("platform").system()


def test_plain_wheel_install(tmp_path):
    """`pip install .` (a wheel, not editable): the hook and the package come from site-packages."""
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=False, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    venv = tmp_path / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT)
    site = Path(next((venv / "lib").glob("python3.*")), "site-packages")
    # The dependencies come from this venv's site-packages as a plain path entry: its .pth files
    # (our editable install among them) are not processed, so only the wheel provides `platform.*`.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run(
        [PYTHON, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q", *wheels.glob("*.whl")],
        check=False, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    probe = "import json, platform, platform.train; print(json.dumps([platform.system(), platform.train.__file__]))"
    for cwd in (tmp_path, REPO):
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe],
            check=False, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        system, train_file = json.loads(result.stdout.splitlines()[-1])
        assert system == __import__("platform").system()
        # From the repo root the repo's folder is on sys.path ('' first) and wins, as a package would.
        expected = REPO / "platform" if cwd == REPO else site / "platform"
        assert Path(train_file).parent == expected
    helped = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "platform.train", "--help"],
        check=False, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr
