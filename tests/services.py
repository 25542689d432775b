"""Real servers on loopback for tests: S3 (moto), PostgreSQL, the MLflow tracking server, Prometheus,
and a file server whose sending a test controls (paced, stalled: `file_server`).

    with PostgresServer() as pg:
        pg.create_database("mlflow")
        with MlflowServer(pg.url("mlflow"), "s3://bucket/mlflow", env={"MLFLOW_S3_ENDPOINT_URL": ...}) as ml:
            mlflow.MlflowClient(ml.url).create_experiment("e")
            ml.stop(); ml.start()          # same port, same database: an outage and a recovery
    with PrometheusServer(["127.0.0.1:9100"]) as prom:
        prom.wait_for_targets_up(30)
        prom.query("up")

Same pattern as tests/ray_cluster.py: each server runs in a session of its own, started through a
launcher that sets PR_SET_PDEATHSIG, so a test run killed even by SIGKILL leaves no server behind
(the temp dir under /tmp does stay then: nothing is left to remove it); stop() signals the server,
kills whatever is left in its session and removes its temp dir. Ports are free ports on 127.0.0.1.
Readiness checks time out with the server's log tail in the error. `startup_seconds` says how long
the last start took; `memory()` sums RSS/PSS over the server's processes.

Facts this relies on (PostgreSQL 15 and Prometheus 2.42 from Debian bookworm, MLflow 3.17; read in
the installed source or checked on a 2-core machine):

* initdb and postgres refuse to run as root ("cannot be run as root"). As root we run them as the
  `postgres` system user (the Debian package creates it; else `nobody`): the launcher drops to that
  uid/gid *before* it sets PR_SET_PDEATHSIG, because the kernel clears the death signal when the
  effective uid changes (and on exec of a setuid binary, which is why `runuser`/`su`, which also
  fork, are no good here). The temp dir is chowned to that user. As a normal user they run as is.
* Postgres reads SIGTERM as "smart shutdown", which waits for every client to disconnect; an MLflow
  server holds a connection pool open, so stop() and the death signal use SIGINT (fast shutdown).
* SQLAlchemy 2.1 maps a plain `postgresql://` URL to the psycopg 3 driver (`psycopg`), no longer to
  psycopg2, so an MLflow server given a production-style URL needs `psycopg[binary]` (psycopg2
  would need `postgresql+psycopg2://`). The tests use psycopg 3 too.
* `mlflow server` is a CLI process that runs migrations on the backend store, then starts
  `python -m uvicorn --workers N mlflow.server.fastapi_app:app` as a child and forwards SIGTERM to
  it. With a database backend it also starts a "job execution" runner (huey consumer), a third
  Python process, by default; tests don't need it, so MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false.
* MLflow's server writes proxied artifacts with boto3: `endpoint_url=MLFLOW_S3_ENDPOINT_URL` if
  set, else boto3's own resolution, which honours AWS_ENDPOINT_URL(_S3) (botocore >= 1.31); the
  credentials and region come from the AWS_* variables. We pass MLFLOW_S3_ENDPOINT_URL explicitly.
* MLflow's client retries a refused connection up to MLFLOW_HTTP_REQUEST_MAX_RETRIES (default 7)
  times with exponential backoff (factor 2): minutes, not a quick failure. Set it (read per call)
  to 0 where a test expects a failure while the server is down.
* Prometheus reloads its config on `POST /-/reload` (only with --web.enable-lifecycle); the
  request returns when the new config is applied, so one Prometheus serves the whole session. But
  target changes reach the scrapers in batches: the discovery manager sends updates at most every
  5 s and the scrape manager applies them on a 5 s ticker of its own (neither configurable in
  2.42). So a new target becomes active up to ~10 s after set_targets() (measured: ~5 s, the
  same at start-up); wait_for_targets_up() covers that, and a test that needs several targets
  should set them in one call.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

VENV_BIN = Path(sys.executable).parent
PG_BIN = Path(os.environ.get("METAPLATFORM_PG_BIN", "/usr/lib/postgresql/15/bin"))
PROMETHEUS_BIN = os.environ.get("METAPLATFORM_PROMETHEUS_BIN", "prometheus")


# send(write, body, closing): how a file's bytes go out; `write` writes and flushes, `closing` is set
# when the server goes (a sender waiting on it returns then).
Sender = Callable[[Callable[[bytes], None], bytes, threading.Event], None]


def send_whole(write: Callable[[bytes], None], body: bytes, closing: threading.Event) -> None:
    write(body)


@contextlib.contextmanager
def file_server(served: Path, send: Sender = send_whole) -> Iterator[str]:
    """An http server on loopback serving the files under `served` (404 for others), each body sent
    by `send` after a Content-Length of the whole file. Yields its base URL."""
    closing = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = served / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

            def write(data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()

            send(write, body, closing)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        closing.set()
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# python -c _LAUNCHER <uid> <gid> <signal> <program> <args...>: become uid/gid (when >= 0), set
# PR_SET_PDEATHSIG (it survives exec, not a uid change), exec the program. A launcher rather than a
# preexec_fn, which is unsafe in a process with threads.
_LAUNCHER = (
    "import ctypes, os, sys\n"
    "uid, gid, sig = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])\n"
    "if gid >= 0:\n"
    "    os.setgroups([])\n"
    "    os.setgid(gid)\n"
    "if uid >= 0:\n"
    "    os.setuid(uid)\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, sig)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "os.execv(sys.argv[4], sys.argv[4:])\n"
)


def _descendants_and_session(root: int) -> list[int]:
    """Pids in the session `root` leads, plus every descendant of `root` (PostgreSQL's backends
    call setsid(), so they leave the postmaster's session but stay its children)."""
    children: dict[int, list[int]] = {}
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(pid)
            if os.getsid(pid) == root:
                found.add(pid)
        except (OSError, ValueError):
            pass
    frontier = [root] if os.path.exists(f"/proc/{root}") else []
    while frontier:
        pid = frontier.pop()
        found.add(pid)
        frontier += [child for child in children.get(pid, ()) if child not in found]
    return sorted(found)


def _http(url: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _Server:
    """One server process (and its children) in a session of its own; a context manager."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, startup_timeout: float):
        self.startup_timeout = startup_timeout
        self.temp_dir: str | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log_path: str | None = None

    def _launch(self, argv: list[str], *, env: dict[str, str] | None = None, uid: int = -1, gid: int = -1) -> None:
        cmd = [sys.executable, "-c", _LAUNCHER, str(uid), str(gid), str(int(self.stop_signal)), *argv]
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=self.temp_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own session: stop() finds every process by it
            )

    def _wait(self, ready, what: str) -> None:
        """Until ready() is true; fails early if the process exits, with the log tail on timeout."""
        deadline, last = time.monotonic() + self.startup_timeout, None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception as e:  # noqa: BLE001 - not ready yet; reported on timeout
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not {what} after {self.startup_timeout}s ({last!r}):\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self._log_path).read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def processes(self) -> list[int]:
        return _descendants_and_session(self._proc.pid) if self._proc is not None else []

    def memory(self) -> dict[str, int]:
        """{'processes': n, 'rss': bytes, 'pss': bytes} summed over `processes()` (PSS counts shared pages once)."""
        total = {"processes": 0, "rss": 0, "pss": 0}
        for pid in self.processes():
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    next(f)  # the "<address range> [rollup]" header
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            total["processes"] += 1
            total["rss"] += int(fields.get("Rss", "0 kB").split()[0]) * 1024
            total["pss"] += int(fields.get("Pss", "0 kB").split()[0]) * 1024
        return total

    def _terminate(self, timeout: float) -> None:
        """stop_signal to the server, then SIGKILL whatever is left in its session."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(self.stop_signal)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(50):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None

    def _remove_temp_dir(self) -> None:
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = 20.0) -> None:
        self._terminate(timeout)
        self._remove_temp_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- S3 ---------------------------------------------------------------------------------------


class S3Server(_Server):
    """moto's standalone S3 server on loopback. Its data lives in memory: a restart (stop(), start(),
    same port) is an outage after which the store is empty, like a replaced bucket.

    `url` is the endpoint ("http://127.0.0.1:<port>"); `env` the AWS_* variables boto3 needs for it.
    """

    name = "moto_server"

    def __init__(self, *, port: int | None = None, startup_timeout: float = 30.0):
        super().__init__(startup_timeout)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "moto-key-7f3a",
            "AWS_SECRET_ACCESS_KEY": "moto-secret-c41d9e",  # distinctive: tests look for it in written files
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> Self:
        started = time.monotonic()
        self.temp_dir = tempfile.mkdtemp(prefix="metaplatform-s3-", dir="/tmp")
        self._log_path = os.path.join(self.temp_dir, "moto.log")
        try:
            self._launch([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)])
            self._wait(lambda: _http(f"{self.url}/")[0] == 200, "answering")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self


# -- PostgreSQL ---------------------------------------------------------------------------------


def _postgres_os_user() -> tuple[int, int]:
    """(uid, gid) to run initdb/postgres as: -1, -1 (as is) unless we are root, who may not."""
    if os.geteuid() != 0:
        return -1, -1
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and there is no `postgres` (or `nobody`) user to run PostgreSQL as")


class PostgresServer(_Server):
    """A private PostgreSQL cluster on 127.0.0.1 with password (SCRAM) auth; a context manager.

    Attributes once started:
      host, port       127.0.0.1 and a free port
      user, password   the superuser and its password (URLs look like production ones)
      socket_dir       the Unix socket directory (local connections: trust)
      temp_dir         data directory, socket, log; removed by stop()
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown; SIGTERM would wait for clients to disconnect

    def __init__(
        self,
        *,
        user: str = "metaplatform",
        password: str = "metaplatform-test",
        startup_timeout: float = 60.0,
        settings: dict[str, str] | None = None,
    ):
        super().__init__(startup_timeout)
        self.user, self.password = user, password
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.socket_dir: str | None = None
        # Test speed over durability: nothing here needs to survive a crash.
        self.settings = {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "100",
            "listen_addresses": self.host,
            **(settings or {}),
        }

    def url(self, database: str = "postgres") -> str:
        """postgresql://USER:PASS@127.0.0.1:PORT/DATABASE (the SQLAlchemy / libpq form)."""
        user, password = urllib.parse.quote(self.user, safe=""), urllib.parse.quote(self.password, safe="")
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs):
        """A psycopg (3) connection over TCP with the password, like any client; a context manager."""
        import psycopg

        return psycopg.connect(self.url(database), **kwargs)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name (owned by `user`); returns its url()."""
        from psycopg import sql

        # autocommit: CREATE DATABASE cannot run in a transaction
        with self.connect(autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def start(self) -> Self:
        started = time.monotonic()
        uid, gid = _postgres_os_user()
        self.temp_dir = tempfile.mkdtemp(prefix="metaplatform-pg-", dir="/tmp")
        self._log_path = os.path.join(self.temp_dir, "postgres.log")
        data, self.socket_dir = os.path.join(self.temp_dir, "data"), os.path.join(self.temp_dir, "sock")
        os.mkdir(self.socket_dir)
        pwfile = os.path.join(self.temp_dir, "pwfile")
        Path(pwfile).write_text(self.password + "\n")
        Path(self._log_path).touch()
        if uid >= 0:
            for path in (self.temp_dir, self.socket_dir, pwfile, self._log_path):
                os.chown(path, uid, gid)
        self.port = free_port()
        try:
            self._launch(
                [
                    str(PG_BIN / "initdb"), "-D", data,
                    "--username", self.user, "--pwfile", pwfile,
                    "--auth-local", "trust", "--auth-host", "scram-sha-256",
                    "--encoding", "UTF8", "--locale", "C",
                    "--no-sync", "--no-instructions",
                ],
                uid=uid, gid=gid,
            )  # fmt: skip
            if self._proc.wait(timeout=self.startup_timeout) != 0:
                raise RuntimeError(f"initdb exited with {self._proc.returncode}:\n{self.log_tail()}")
            os.unlink(pwfile)
            argv = [str(PG_BIN / "postgres"), "-D", data, "-p", str(self.port), "-k", self.socket_dir]
            for key, value in self.settings.items():
                argv += ["-c", f"{key}={value}"]
            self._launch(argv, uid=uid, gid=gid)
            self._wait(self._accepts_connections, "accepting connections")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _accepts_connections(self) -> bool:
        self.connect(connect_timeout=2).close()
        return True


# -- MLflow -------------------------------------------------------------------------------------

# The caller's variables that would point the server (or its boto3) elsewhere; `env` may set them.
_MLFLOW_FOREIGN_PREFIXES = ("MLFLOW_", "_MLFLOW_")


class MlflowServer(_Server):
    """The real `mlflow server` (uvicorn, one worker) with a SQL backend store and proxied artifacts.

    `backend_store_uri`: e.g. PostgresServer.url("mlflow"). `artifacts_destination`: where the server
    writes the artifacts clients upload through it, e.g. "s3://bucket/prefix" (then pass the S3
    endpoint in `env`: MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION). The server's environment is os.environ as at construction, without the
    caller's MLFLOW_* variables, plus `env`; it is the same for every start().

    stop() then start() brings the server back on the same port with the same database, like a
    restarted deployment. Attributes: `url` ("http://127.0.0.1:<port>"), `port`, `startup_seconds`.
    """

    name = "mlflow server"

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str,
        env: dict[str, str] | None = None,
        *,
        port: int | None = None,
        workers: int = 1,
        startup_timeout: float = 90.0,
    ):
        super().__init__(startup_timeout)
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        self.workers = workers
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(_MLFLOW_FOREIGN_PREFIXES)},
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey consumer process
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }

    def start(self) -> Self:
        started = time.monotonic()
        self.temp_dir = tempfile.mkdtemp(prefix="metaplatform-mlflow-", dir="/tmp")  # its cwd
        self._log_path = os.path.join(self.temp_dir, "mlflow.log")
        argv = [
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", self.artifacts_destination,
            "--serve-artifacts",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", str(self.workers),
            # On SIGTERM uvicorn waits for open connections (clients keep them alive) otherwise.
            "--uvicorn-opts", "--timeout-graceful-shutdown 1",
        ]  # fmt: skip
        try:
            self._launch(argv, env=self.env)
            self._wait(self._answers, "answering")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _answers(self) -> bool:
        # /health is a constant "OK"; an API call also proves the backend store works.
        if _http(f"{self.url}/health", timeout=2)[0] != 200:
            return False
        status, body = _http(f"{self.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        if status != 200:
            raise RuntimeError(f"experiments/search answered {status}: {body[:200]!r}")
        return True


# -- Prometheus ---------------------------------------------------------------------------------


class PrometheusServer(_Server):
    """The `prometheus` binary with one scrape job (`job="test"`) over `targets` ("host:port").

    set_targets() rewrites the config and reloads it (POST /-/reload), so one server can serve a
    whole test session. Attributes: `url`, `port`, `targets`, `startup_seconds`.
    """

    name = "prometheus"
    job = "test"

    def __init__(
        self,
        targets: list[str] | tuple[str, ...] = (),
        scrape_interval: str = "1s",
        *,
        startup_timeout: float = 30.0,
    ):
        super().__init__(startup_timeout)
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.port: int | None = None
        self.url: str | None = None
        self._config_path: str | None = None

    def _write_config(self) -> None:
        config = {  # JSON is YAML
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}]}],
        }
        tmp = self._config_path + ".tmp"
        Path(tmp).write_text(json.dumps(config, indent=2))
        os.replace(tmp, self._config_path)

    def start(self) -> Self:
        started = time.monotonic()
        self.temp_dir = tempfile.mkdtemp(prefix="metaplatform-prom-", dir="/tmp")
        self._log_path = os.path.join(self.temp_dir, "prometheus.log")
        self._config_path = os.path.join(self.temp_dir, "prometheus.yml")
        self._write_config()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            PROMETHEUS_BIN if os.sep in PROMETHEUS_BIN else (shutil.which(PROMETHEUS_BIN) or PROMETHEUS_BIN),
            f"--config.file={self._config_path}",
            f"--storage.tsdb.path={os.path.join(self.temp_dir, 'data')}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]
        try:
            self._launch(argv)
            self._wait(lambda: _http(f"{self.url}/-/ready", timeout=2)[0] == 200, "ready")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def set_targets(self, targets: list[str]) -> None:
        """Scrape `targets` from now on (rewrites the config and reloads it)."""
        self.targets = list(targets)
        self._write_config()
        status, body = _http(f"{self.url}/-/reload", data=b"", timeout=30)
        if status != 200:
            raise RuntimeError(f"prometheus reload failed ({status}): {body.decode(errors='replace')}")

    def add_target(self, target: str) -> None:
        if target not in self.targets:
            self.set_targets([*self.targets, target])

    def remove_target(self, target: str) -> None:
        if target in self.targets:
            self.set_targets([t for t in self.targets if t != target])

    def _api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        status, body = _http(url, timeout=30)
        reply = json.loads(body)
        if status != 200 or reply.get("status") != "success":
            raise RuntimeError(f"prometheus {path} failed ({status}): {reply.get('error', body[:200])}")
        return reply["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict]:
        """An instant PromQL query: the result list (vector or matrix), each {"metric", "value(s)"}."""
        data = self._api("query", query=expr, time=time)
        return data["result"] if isinstance(data["result"], list) else [data["result"]]

    def active_targets(self) -> list[dict]:
        """/api/v1/targets' activeTargets: each has labels.instance, health ("up"/"down"/"unknown"), lastError."""
        return self._api("targets", state="active")["activeTargets"]

    def target_health(self) -> dict[str, str]:
        """{instance: "up" | "down" | "unknown"} over the active targets."""
        return {t["labels"].get("instance"): t["health"] for t in self.active_targets()}

    def wait_for_targets_up(self, timeout: float = 30.0) -> None:
        """Until every configured target is active and its last scrape succeeded.

        Targets removed by set_targets() may stay active a few seconds longer; they are ignored.
        """
        deadline, active = time.monotonic() + timeout, []
        while True:
            active = self.active_targets()
            health = {t["labels"].get("instance"): t["health"] for t in active}
            if all(health.get(target) == "up" for target in self.targets):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        report = [(t["labels"].get("instance"), t["health"], t.get("lastError")) for t in active]
        raise TimeoutError(f"targets {self.targets} not all up after {timeout}s: {report}\n{self.log_tail()}")


if __name__ == "__main__":
    # `python tests/services.py`: start each server, print its start-up time and memory, stop it.
    with PostgresServer() as pg, tempfile.TemporaryDirectory() as artifacts:
        print(f"postgres   started in {pg.startup_seconds:.2f}s; memory {pg.memory()}")
        db = pg.create_database("mlflow")
        with MlflowServer(db, artifacts) as ml:
            print(f"mlflow     started in {ml.startup_seconds:.2f}s; memory {ml.memory()}")
            ml.stop()
            ml.start()
            print(f"mlflow     restarted in {ml.startup_seconds:.2f}s; memory {ml.memory()}")
    with PrometheusServer([]) as prom:
        print(f"prometheus started in {prom.startup_seconds:.2f}s; memory {prom.memory()}")
