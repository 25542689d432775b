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
        head_env = {
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
        }
        cmd = [
            sys.executable, "-c", _LAUNCHER,
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--port", str(gcs_port),
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port),
            # These two have fixed defaults (10001, 52365): two clusters on one machine would clash.
            "--ray-client-server-port", str(client_port),
            "--dashboard-agent-listen-port", str(agent_port),
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
            "--log-style", "record",
            "--log-color", "false",
        ]  # fmt: skip
        if self.object_store_memory:
            cmd += ["--object-store-memory", str(self.object_store_memory)]
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                env=head_env,
                cwd=self.temp_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own session: stop() finds every process by it
            )
        try:
            self._wait_ready(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

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


if __name__ == "__main__":
    # `python tests/ray_cluster.py [num_cpus]`: start one, print how to use it, stop on Ctrl-C.
    with LocalRayCluster(int(sys.argv[1]) if len(sys.argv) > 1 else 4) as c:
        print(f"started in {c.startup_seconds:.1f}s; memory {c.memory()}")
        print(" ".join(f"{k}={v}" for k, v in c.env.items()))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
