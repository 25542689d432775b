"""A private Ray head node for tests: `ray start --head --block` on this machine, with token auth.

    with LocalRayCluster(num_cpus=4) as cluster:
        subprocess.run([sys.executable, "-c", "import ray; ray.init(); ..."], env=cluster.subprocess_env())
        subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard_url, ...], env=cluster.subprocess_env())

Facts this relies on (Ray 2.60, read in the installed source and checked on a 2-core machine):

* `ray start --head` turns token auth on only when RAY_AUTH_MODE=token, or when RAY_AUTH_MODE is
  unset and a token can be found (RAY_AUTH_TOKEN, else the file in RAY_AUTH_TOKEN_PATH, else
  ~/.ray/auth_token). A bare `ray.init()` that starts a new cluster turns it on by default and
  writes ~/.ray/auth_token if it is missing, so whether a bare `ray start` uses auth depends on
  what ran on the machine before. We always pass RAY_AUTH_MODE=token plus a fresh RAY_AUTH_TOKEN,
  so ~/.ray/auth_token is neither read nor written and the cluster never depends on it.
* A client that connects to an explicit address (`ray.init(address=...)` or RAY_ADDRESS) never
  switches auth on by itself: it needs RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN here).
  The job CLI / JobSubmissionClient likewise only send `Authorization: Bearer <token>` when
  RAY_AUTH_MODE=token. Both read RAY_AUTH_MODE once, when `ray` is imported: set the variables
  in the environment of a *new* process (see `subprocess_env`), not in one that imported ray.
* Ray processes inherit the environment of `ray start`, so workers, the job supervisor and job
  entrypoints all get the token and can call `ray.init()` without further setup. A job
  entrypoint's `python` is looked up on the PATH of `ray start`, so this venv's bin goes first.
* `ray stop` kills every Ray process of the machine (it matches process names), other people's
  clusters included. So we never call it: `ray start --block` runs in a session of its own; on
  SIGTERM it shuts its processes down, and anything left over in that session (or running in our
  temp dir, e.g. job entrypoints, which Ray starts in sessions of their own) is killed after.
* Ray replaces 127.0.0.1 by the machine's reachable IP as the node address and the GCS listens on
  all interfaces; token auth guards it. The dashboard (job server) listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

VENV_BIN = Path(sys.executable).parent
# Variables of the caller that would point Ray elsewhere; dropped from every environment we build.
_FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_info(pid: int) -> tuple[int, str, str] | None:
    """(session id, command line, cwd) of a process, or None when it is gone or not ours to read."""
    try:
        sid = os.getsid(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ProcessLookupError):
        return None
    return sid, cmdline, cwd


# Runs `argv[1:]` with PR_SET_PDEATHSIG = SIGTERM (Linux; it survives exec): when the test run dies, even
# by SIGKILL, `ray start --block` gets SIGTERM and stops its processes. (Done in a launcher rather than
# a preexec_fn, which is unsafe in a process with threads.)
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return pids


class LocalRayCluster:
    """One Ray head node on this machine, private to its owner; a context manager.

    Attributes once started:
      address        GCS address "127.0.0.1:<port>" for `ray.init(address=...)` / RAY_ADDRESS
      dashboard_url  "http://127.0.0.1:<port>", the job server, for `ray job submit --address`
      token          the auth token (also in `env`)
      env            the variables a client process needs: RAY_ADDRESS, RAY_API_SERVER_ADDRESS,
                     RAY_AUTH_MODE=token, RAY_AUTH_TOKEN
      temp_dir       Ray's --temp-dir (sessions, logs, unpacked working dirs); removed by stop()
      startup_seconds  how long `start()` took
    """

    def __init__(
        self,
        num_cpus: int = 4,
        *,
        object_store_memory: int | None = 512 * 1024**2,
        startup_timeout: float = 120.0,
        extra_env: dict[str, str] | None = None,
    ):
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.address: str | None = None
        self.dashboard_url: str | None = None
        self.token: str | None = None
        self.env: dict[str, str] = {}
        self.temp_dir: str | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self.nodes: list[RayNode] = []
        self._log_path: str | None = None

    # -- environments -------------------------------------------------------------------------

    @staticmethod
    def _clean_environ() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _FOREIGN}

    def subprocess_env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """A full environment for a client subprocess: `base` (default os.environ) + `env` + extra."""
        environ = {k: v for k, v in (os.environ if base is None else base).items() if k not in _FOREIGN}
        return {**environ, **self.env, **extra}

    # -- life cycle ---------------------------------------------------------------------------

    def _node_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a `ray start` (head or worker node): the token, and this venv first on PATH."""
        return {
            **self._clean_environ(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",  # so "Ray runtime started." reaches the log at once
            # On SIGTERM `ray start --block` first drains the node, for up to 30 s by default (it took
            # the full 30 s here when a test run was killed); a test cluster has nothing to drain.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # Job entrypoints run `python ...` through this PATH: make it this venv's python.
            "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
            **self.extra_env,
            **(extra or {}),
        }

    def _launch(self, args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
        """`ray start --block <args>` in a session of its own (so its processes can be found and killed)."""
        cmd = [
            sys.executable, "-c", _LAUNCHER, str(VENV_BIN / "ray"), "start", "--block", *args,
            "--num-gpus", "0",
            "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
            "--log-style", "record",
            "--log-color", "false",
        ]  # fmt: skip
        if self.object_store_memory:
            cmd += ["--object-store-memory", str(self.object_store_memory)]
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                cmd,
                env=env,
                cwd=self.temp_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> Self:
        started = time.monotonic()
        # A short path: Ray puts Unix sockets under <temp_dir>/session_<date>_<pid>/sockets/ and
        # socket paths are limited to 107 bytes, so pytest's long tmp_path is no good here.
        self.temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
        self._log_path = os.path.join(self.temp_dir, "ray-start.log")
        self.token = secrets.token_hex(32)  # what Ray's own token generator does
        gcs_port, dashboard_port, client_port, agent_port = (_free_port() for _ in range(4))
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.env = {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        args = [
            "--head",
            "--port", str(gcs_port),
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port),
            # These two have fixed defaults (10001, 52365): two clusters on one machine would clash.
            "--ray-client-server-port", str(client_port),
            "--dashboard-agent-listen-port", str(agent_port),
            "--num-cpus", str(self.num_cpus),
        ]  # fmt: skip
        self._proc = self._launch(args, self._node_env(), self._log_path)
        try:
            self._wait_ready(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self._prioritize_gcs()
        self.startup_seconds = time.monotonic() - started
        return self

    def _prioritize_gcs(self) -> None:
        """Give the GCS a higher CPU priority (root only), as a real head node has cores of its own.

        Here it shares 2 cores with the training it coordinates; starved, it once took over 30 s to
        answer a joining node, and `ray start` gives up after a fixed 30 s."""
        for pid in _session_pids(self._proc.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "gcs_server":
                        os.setpriority(os.PRIO_PROCESS, pid, -10)
            except OSError:  # not root, or the process is gone
                pass

    def _wait_ready(self, deadline: float) -> None:
        """Until `ray start` says it is done and the job server answers an authenticated request."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
        )
        last = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self._proc.returncode}:\n{self.log_tail()}")
            if "Ray runtime started" not in Path(self._log_path).read_text(errors="replace"):
                time.sleep(0.25)
                continue
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(0.25)
        raise TimeoutError(f"Ray head not ready after {self.startup_timeout}s ({last}):\n{self.log_tail()}")

    def add_node(self, num_cpus: int = 1, env: dict[str, str] | None = None) -> RayNode:
        """Start a worker node (`ray start --address <head>`) on this machine and wait until it has joined.

        `env` adds to its environment (e.g. its own METAPLATFORM_CACHE: a node of its own disk).
        """
        node = RayNode(self, num_cpus, env)
        self.nodes.append(node)
        node.start()
        return node

    def node_states(self) -> list[dict]:
        """The cluster's nodes as the state API lists them (node_id, state ALIVE/DEAD, resources_total, ...)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=1000", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"]["result"]["result"]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self._log_path).read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def processes(self) -> list[int]:
        """Pids of this cluster's processes: our session, plus anything running in our temp dir."""
        if self._proc is None or not self.temp_dir:
            return []
        sid, mine, pids = self._proc.pid, _ancestors(), []
        inside = self.temp_dir + os.sep
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in mine:
                continue
            info = _proc_info(int(entry))
            if info and (info[0] == sid or (info[2] + os.sep).startswith(inside) or inside in info[1]):
                pids.append(int(entry))
        return pids

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

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM `ray start --block` (it stops its processes), then kill whatever of ours is left."""
        for node in self.nodes:
            node.kill()
        self.nodes = []
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
                pids = self.processes()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
                end = time.monotonic() + grace
                while time.monotonic() < end and self.processes():
                    time.sleep(0.1)
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _session_pids(sid: int) -> list[int]:
    mine = _ancestors()
    return [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and int(e) not in mine and (_proc_info(int(e)) or (0,))[0] == sid
    ]


class RayNode:
    """A worker node of a LocalRayCluster: `ray start --address <head>` with its own raylet, agents and
    worker processes, all in one process session, so `kill()` ends it the way a crashed host would."""

    def __init__(self, cluster: LocalRayCluster, num_cpus: int, env: dict[str, str] | None):
        self.cluster, self.num_cpus, self.extra_env = cluster, num_cpus, dict(env or {})
        self.node_id: str | None = None
        self._proc: subprocess.Popen | None = None

    def start(self, attempts: int = 3) -> None:
        """Start the node and wait until it has joined. A `ray start` whose raylet did not register
        with the GCS within Ray's fixed 30 s (seen in CI, with a run keeping both cores busy) is
        tried again."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError as e:
                self.kill()
                if attempt == attempts - 1 or "timed out during startup" not in str(e):
                    raise

    def _start_once(self) -> None:
        before = {n["node_id"] for n in self.cluster.node_states()}
        ports = [_free_port() for _ in range(6)]
        args = [
            "--address", self.cluster.address,
            "--num-cpus", str(self.num_cpus),
            # Every port a node opens, chosen free: the defaults of some of them are fixed and would clash.
            "--node-manager-port", str(ports[0]),
            "--object-manager-port", str(ports[1]),
            "--dashboard-agent-listen-port", str(ports[2]),
            "--dashboard-agent-grpc-port", str(ports[3]),
            "--metrics-export-port", str(ports[4]),
            "--runtime-env-agent-port", str(ports[5]),
        ]  # fmt: skip
        log_path = os.path.join(self.cluster.temp_dir, f"ray-node-{ports[0]}.log")
        self._proc = self.cluster._launch(args, self.cluster._node_env(self.extra_env), log_path)
        deadline = time.monotonic() + self.cluster.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"worker node exited with {self._proc.returncode}:\n{Path(log_path).read_text()}")
            new = [
                n["node_id"] for n in self.cluster.node_states() if n["node_id"] not in before and n["state"] == "ALIVE"
            ]
            if new:
                self.node_id = new[0]
                return
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(
            f"worker node did not join within {self.cluster.startup_timeout}s:\n{Path(log_path).read_text()}"
        )

    def pids(self) -> list[int]:
        return _session_pids(self._proc.pid) if self._proc else []

    def kill(self) -> None:
        """SIGKILL every process of the node at once: no drain, no goodbye to the GCS (a lost host)."""
        if self._proc is None:
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._proc.wait()
        self._proc = None


if __name__ == "__main__":
    # `python tests/ray_cluster.py [num_cpus]`: start one, print how to use it, stop on Ctrl-C.
    with LocalRayCluster(int(sys.argv[1]) if len(sys.argv) > 1 else 4) as c:
        print(f"started in {c.startup_seconds:.1f}s; memory {c.memory()}")
        print(" ".join(f"{k}={v}" for k, v in c.env.items()))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
