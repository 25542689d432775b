"""The Dockerfile, built and run for real: buildah (no daemon) on a local Debian base, podman to run.

The image is built once per session by scripts/build-image.sh (the same command CI and a developer
use), on `localhost/metaplatform-base:bookworm-py311` (made by debootstrap once, then reused from
podman's store) with the CPU torch wheel; production builds use the CUDA base (docs/deploy.md).
Containers run as the chart runs them: uid 1000, read-only root filesystem, /tmp writable.
Every container is started with --rm under a unique name and removed in a `finally`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/metaplatform:test"
# podman's defaults here exceed what this machine lets a container set; runc as the runtime.
PODMAN_RUN = [
    "podman", "run", "--rm", "--runtime", "runc",
    "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
]  # fmt: skip
# How the chart runs the image (values.yaml securityContext, emptyDir on /tmp, HOME=/tmp).
LOCKED_DOWN = [
    "--user", "1000:100", "--read-only", "--tmpfs", "/tmp:rw,exec,mode=1777",
    "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--env", "HOME=/tmp",
]  # fmt: skip
BUILD_TIMEOUT = 1200


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def run(*args: str, timeout: float = 300, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A command in a fresh locked-down container of the image."""
    return subprocess.run(
        [*PODMAN_RUN, *LOCKED_DOWN, *options, IMAGE, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def image() -> dict:
    """Builds the image (once per session); returns the image's config and the build's duration."""
    missing = [t for t in ("buildah", "podman", "runc", "debootstrap") if not shutil.which(t)]
    if missing:
        pytest.fail(f"{missing} not installed: bash scripts/system-packages.sh installs them (as root)")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "scripts/build-image.sh", IMAGE],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    seconds = time.monotonic() - started
    print(f"\nimage build: {seconds:.0f} s", file=sys.stderr)
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    return {"config": config, "seconds": seconds}


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "Dockerfile"], check=False, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every ignored rule carries a reason on the lines before it.
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"unexplained ignore at line {i + 1}"
            )


def test_dockerfile_defaults_to_the_cuda_ray_image():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    torch = re.search(r'^ARG TORCH_SPEC="?([^"\s]+)"?$', text, re.MULTILINE).group(1)
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.MULTILINE).group(1)
    ray = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.MULTILINE).group(1)
    cuda = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(cu\d+)", base)
    assert cuda, base
    assert cuda.group(1) == ray  # the base image's Ray is the Ray we install
    assert torch.endswith("+" + cuda.group(2)) and index.endswith("/" + cuda.group(2))  # torch matches the CUDA


def test_image_metadata(image):
    config = image["config"]["Config"]
    assert config["User"] == "1000:100"
    assert config["WorkingDir"] == "/opt/metaplatform"
    assert any(e.startswith("PATH=/opt/venv/bin:") for e in config["Env"])


def test_train_help_from_root_and_stdlib_platform_intact(image):
    result = run("python", "-m", "platform.train", "--help", options=("--workdir", "/"))
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--config" in result.stdout

    probe = (
        "import json, platform, sysconfig; import platform.train, platform.evaluate; "
        "print(json.dumps([platform.system(), platform.machine(), platform.__file__, platform.train.__file__, "
        "sysconfig.get_path('purelib')]))"
    )
    result = run("python", "-c", probe, options=("--workdir", "/"))
    assert result.returncode == 0, result.stderr
    system, machine, stdlib, train, site = json.loads(result.stdout.splitlines()[-1])
    assert (system, machine) == ("Linux", os.uname().machine)
    assert stdlib.endswith("/platform.py") and not stdlib.startswith(site)
    # Installed, not editable: the package and its start-up hook are in the venv's site-packages.
    assert train == f"{site}/platform/train.py"
    result = run("ls", site)
    assert {"metaplatform.pth", "metaplatform_hook.py"} <= set(result.stdout.split())


def test_pipeline_steps_run_on_the_image(image):
    """The Kubeflow pipeline's components run `python3 -m kfp.dsl.executor_main` on this image with no
    install step: kfp, its Kubernetes extension and the steps are there, and stdlib `platform` is intact."""
    probe = (
        "import json, platform, kfp, kfp.dsl.executor_main, kfp.kubernetes, pipelines.steps; "
        "from pipelines.pipeline import build_pipeline; build_pipeline('x'); "
        "print(json.dumps([kfp.__version__, platform.system(), pipelines.steps.__file__]))"
    )
    result = run("python3", "-c", probe, options=("--workdir", "/"))
    assert result.returncode == 0, result.stderr[-3000:]
    version, system, steps = json.loads(result.stdout.splitlines()[-1])
    assert version.startswith("2.") and system == "Linux" and steps.startswith("/opt/venv/lib/")


def test_login_shell_finds_the_venv(image):
    """KubeRay's commands run in `bash -lc`: Debian's /etc/profile resets PATH, the image puts the venv back."""
    result = run("/bin/bash", "-lc", "--", "command -v ray python mlflow wget")
    assert result.returncode == 0, result.stderr
    # wget: KubeRay's readiness probes call it.
    assert result.stdout.split() == [
        "/opt/venv/bin/ray",
        "/opt/venv/bin/python",
        "/opt/venv/bin/mlflow",
        "/usr/bin/wget",
    ]


def test_runs_as_uid_1000_by_default(image):
    result = subprocess.run([*PODMAN_RUN, IMAGE, "id", "-u"], check=False, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "1000", result.stderr


def test_the_proxy_ca_is_not_in_the_image(image, tmp_path):
    """The build used this machine's CA bundle (HTTPS goes through an intercepting proxy) as a build
    secret: the certificates the base image does not carry appear in no file of the image."""
    host = _certificates(Path("/etc/ssl/certs/ca-certificates.crt").read_text())
    image_bundle = run("cat", "/etc/ssl/certs/ca-certificates.crt")
    assert image_bundle.returncode == 0, image_bundle.stderr
    extra = host - _certificates(image_bundle.stdout)
    if not extra:
        pytest.skip("this machine's CA bundle has no certificate of its own: nothing a build could leak")
    # One base64 line from inside each certificate, searched in every file, as root.
    needles = tmp_path / "needles"
    needles.write_text("".join(c.splitlines()[2] + "\n" for c in extra))
    result = subprocess.run(
        [*PODMAN_RUN, "--user", "0", "-v", f"{needles}:/probe/needles:ro", IMAGE,
         "grep", "-rlsF", "-f", "/probe/needles", "/", "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev"],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # The mounted needle file itself is found: proof the search works.
    assert result.stdout.split() == ["/probe/needles"], result.stdout + result.stderr


def _certificates(bundle: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", bundle, re.DOTALL))


def test_database_driver_and_mlflow_auth_are_in_the_image(image):
    """What the chart's MLflow pod needs: a PostgreSQL driver for `postgresql://` URIs and the
    basic-auth app (mlflow[auth])."""
    probe = (
        "import sqlalchemy; sqlalchemy.create_engine('postgresql://u:p@db:5432/mlflow'); "
        "import flask_wtf, mlflow.server.auth.db.utils; print('ok')"
    )
    result = run("python", "-c", probe)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_sinusoid_run_checkpoints_to_a_mounted_volume(image, tmp_path):
    volume = tmp_path / "checkpoints"
    volume.mkdir()
    os.chmod(volume, 0o777)  # the container's uid 1000 writes here
    result = run(
        "python", "-m", "platform.train", "--config", "configs/sinusoid.yaml",
        "optim.iterations=20", "checkpoint.every=10", "checkpoint.dir=/checkpoints/run",
        "eval.every=0", "log_every=10", "tracking.mlflow=false",
        options=("-v", f"{volume}:/checkpoints:rw", "--shm-size", "256m"),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "done: 20 iterations" in result.stdout
    assert sorted(p.name for p in (volume / "run").glob("ckpt-*.pt")) == ["ckpt-00000010.pt", "ckpt-00000020.pt"]

    result = run(
        "python", "-m", "platform.evaluate", "--checkpoint", "/checkpoints/run", "--tasks", "20",
        options=("-v", f"{volume}:/checkpoints:ro"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_ray_head_and_worker_containers(image, tmp_path):
    """`ray start` in a head container (no CPUs for actors, as in the chart) and a worker container,
    token auth on; a training job submitted to the head runs its actors on the worker."""
    token = secrets.token_hex(32)
    gcs, dashboard, client, head_agent, worker_agent, head_metrics, worker_metrics = _free_ports(7)
    suffix = uuid.uuid4().hex[:8]
    head, worker = f"metaplatform-head-{suffix}", f"metaplatform-worker-{suffix}"
    common = [
        *PODMAN_RUN, *LOCKED_DOWN, "--detach", "--network", "host", "--shm-size", "512m",
        "--env", "RAY_AUTH_MODE=token", "--env", f"RAY_AUTH_TOKEN={token}",
        "--env", "RAY_USAGE_STATS_ENABLED=0", "--env", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0",
    ]  # fmt: skip
    # Both nodes on loopback: nothing leaves this machine.
    start = "ray start --block --disable-usage-stats --node-ip-address 127.0.0.1 --object-store-memory 200000000"
    head_start = (
        f"{start} --head --port {gcs} --num-cpus 0 --dashboard-host 127.0.0.1 --dashboard-port {dashboard} "
        f"--ray-client-server-port {client} --dashboard-agent-listen-port {head_agent} --metrics-export-port {head_metrics}"
    )
    worker_start = (
        f"{start} --address 127.0.0.1:{gcs} --num-cpus 2 "
        f"--dashboard-agent-listen-port {worker_agent} --metrics-export-port {worker_metrics}"
    )
    try:
        # As KubeRay runs it: a login shell (`/bin/bash -lc -- "...; ray start ..."`), whose profile
        # must leave the image's venv first on PATH.
        for name, command in ((head, head_start), (worker, worker_start)):
            subprocess.run(
                [*common, "--name", name, IMAGE, "/bin/bash", "-lc", "--", command],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        # The job goes in through the head's job API with the token, as the chart's submitter does.
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        }
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_nodes(address, env, 2)
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--",
             "python", "-m", "platform.train", "--config", "configs/sinusoid.yaml", "optim.iterations=10",
             "eval.every=0", "log_every=5", "checkpoint.dir=/tmp/run", "tracking.mlflow=false"],
            check=False, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        logs = submit.stdout + submit.stderr
        assert submit.returncode == 0, logs[-4000:] + podman("logs", head, check=False).stderr[-2000:]
        assert "done: 10 iterations" in logs
        # Both actors ran on the worker node: the head offers no CPU.
        nodes = re.findall(r"on node ([0-9a-f]+)", logs)
        assert len(nodes) == 2 and len(set(nodes)) == 1, logs[-3000:]
    finally:
        for name in (worker, head):
            podman("rm", "--force", "--time", "10", name, check=False, timeout=60)


def _wait_for_nodes(address: str, env: dict, count: int, timeout: float = 120) -> None:
    deadline, last = time.monotonic() + timeout, ""
    probe = (
        "import json, sys, ray; from ray.util.state import list_nodes; "
        f"print(json.dumps([n.state for n in list_nodes(address={address!r})]))"
    )
    while time.monotonic() < deadline:
        result = subprocess.run([sys.executable, "-c", probe], check=False, env=env, capture_output=True, text=True)
        last = result.stdout + result.stderr[-500:]
        if result.returncode == 0 and json.loads(result.stdout.splitlines()[-1]).count("ALIVE") >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"not {count} Ray nodes alive after {timeout}s: {last}")


def test_chart_mlflow_pod_runs_in_the_image(image, tmp_path, postgres, s3_server, s3_bucket, monkeypatch):
    """The chart's MLflow pod, on the image, locked down as the chart runs it: its init containers
    migrate a real PostgreSQL, the server (basic auth on) answers and stores artifacts in S3."""
    import boto3
    import mlflow
    import yaml
    from deploy_tools import container_argv, container_env, one, render, secret_data

    port = _free_ports(1)[0]
    values = {
        "generateSecrets": True,
        "s3": {"endpoint": s3_server, "existingSecret": "s3-credentials"},
        "mlflow": {
            "port": port,
            "workers": 1,
            "artifactsDestination": f"s3://{s3_bucket}/mlflow",
            "backendStore": {"existingSecret": "mlflow-db"},
            "auth": {"enabled": True},
        },
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    objects = render([tmp_path / "values.yaml"])
    secrets = secret_data(
        objects,
        {
            "mlflow-db": {"uri": postgres.create_database(f"image_{uuid.uuid4().hex[:8]}")},
            "s3-credentials": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        },
    )
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    name = f"metaplatform-mlflow-{uuid.uuid4().hex[:8]}"

    def podman_args(container):
        env = container_env(container, secrets)
        env_file = tmp_path / f"{container['name']}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        argv = container_argv(container, env)
        # host network: the tests' PostgreSQL and S3 listen on loopback.
        options = [*LOCKED_DOWN, "--network", "host", "--env-file", str(env_file), "--entrypoint", argv[0]]
        return options, argv[1:]

    for container in pod["initContainers"]:
        options, argv = podman_args(container)
        result = subprocess.run(
            [*PODMAN_RUN, *options, IMAGE, *argv], check=False, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{container['name']}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    options, argv = podman_args(pod["containers"][0])
    try:
        subprocess.run([*PODMAN_RUN, "--detach", "--name", name, *options, IMAGE, *argv], check=True, timeout=120)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _answers(f"{url}/health"):
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-3000:]
            assert podman("container", "exists", name, check=False).returncode == 0, "the server exited"
            time.sleep(0.5)
        admin = secrets["mp-metaplatform-mlflow-auth"]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin["username"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin["password"])
        client = mlflow.MlflowClient(tracking_uri=url)
        run_id = client.create_run(client.create_experiment("image-check")).info.run_id
        client.log_text(run_id, "probe", "probe.txt")
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert any(k.startswith("mlflow/") and k.endswith("/probe.txt") for k in keys), keys
    finally:
        podman("rm", "--force", "--time", "5", name, check=False, timeout=60)


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
