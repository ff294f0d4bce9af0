"""A RabbitMQ node of the fault suite's own: its ports, node name, data and logs.

The suite restarts and kills this node, so it must not be the server other tests use:
``RabbitNode`` runs ``rabbitmq-server`` with every place it writes (mnesia, logs, pid file,
Erlang cookie via ``HOME``) under a temporary directory, AMQP and distribution ports
chosen free on 127.0.0.1 (never 5672/25672), its own ``RABBITMQ_NODENAME`` and an enabled-
plugins file naming only the exchanges Conveyor uses. It reads no ``/etc/rabbitmq`` file
(``RABBITMQ_CONF_ENV_FILE`` and ``RABBITMQ_CONFIG_FILE`` point into the directory).

    node = RabbitNode(tmp_path); node.start()       # until the AMQP port answers
    node.stop_app(); node.start_app()                 # rabbitmqctl -n NODE ...
    node.kill(); node.start()                         # kill -9 of beam, then boot again
    node.shutdown()                                   # stop, and delete the directory
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

PLUGINS = ("rabbitmq_consistent_hash_exchange", "rabbitmq_random_exchange")
#: Where Debian/Ubuntu keep the real scripts; /usr/sbin holds a wrapper that runs them as
#: the rabbitmq user from /var/lib/rabbitmq, which would not reach our directory.
SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/lib/rabbitmq/sbin")
BOOT_TIMEOUT_S = 90.0


class NodeError(RuntimeError):
    """The test node did not do what it was told (its log tail says why)."""


def find_scripts() -> Path | None:
    """The directory holding ``rabbitmq-server`` and ``rabbitmqctl``, or None."""
    candidates = [os.environ.get("CONVEYOR_RABBITMQ_SBIN", ""), *SCRIPT_DIRS]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for directory in filter(None, candidates):
        path = Path(directory)
        if (path / "rabbitmq-server").exists() and (path / "rabbitmqctl").exists():
            text = (path / "rabbitmq-server").read_bytes()[:4000]
            if b"su rabbitmq" not in text:  # the packaging wrapper, not the server
                return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


class RabbitNode:
    """One RabbitMQ node under ``root``; see the module docstring."""

    def __init__(self, root: Path, scripts: Path) -> None:
        self.root = root
        self.scripts = scripts
        self.name = f"conveyor-faults-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self._server: subprocess.Popen[bytes] | None = None
        self._boots = 0
        root.mkdir(parents=True, exist_ok=True)
        (root / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
        )
        (root / "rabbitmq-env.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        ctl_min = free_port()
        return {
            **os.environ,
            "HOME": str(self.root),  # the Erlang cookie of this node and its CLI
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback,
            "RABBITMQ_CTL_ERL_ARGS": loopback,
            "RABBITMQ_CTL_DIST_PORT_MIN": str(ctl_min),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(ctl_min),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = BOOT_TIMEOUT_S) -> float:
        """Boot the node (again, after ``kill``); seconds until its AMQP port answered."""
        if self._server is not None and self._server.poll() is None:
            raise NodeError(f"node {self.name} is already running")
        self._boots += 1
        out = (self.root / f"server-{self._boots}.out").open("wb")
        began = time.monotonic()
        self._server = subprocess.Popen(
            [str(self.scripts / "rabbitmq-server")],
            stdout=out, stderr=subprocess.STDOUT, env=self._env(), cwd=self.root,
            start_new_session=True,  # a Ctrl-C of pytest does not reach it
        )
        out.close()
        self.wait_answering(timeout)
        return time.monotonic() - began

    def wait_answering(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        give_up = time.monotonic() + timeout
        while not answers(self.port):
            if self._server is not None and self._server.poll() is not None:
                raise NodeError(f"node {self.name} exited with {self._server.returncode}\n"
                                f"{self.log_tail()}")
            if time.monotonic() > give_up:
                raise NodeError(f"node {self.name} not answering after {timeout:g} s\n"
                                f"{self.log_tail()}")
            time.sleep(0.1)  # polling a port; nothing to wait on

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n NODE ARGS``; its output, or NodeError with it."""
        done = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", self.name, *args],
            capture_output=True, env=self._env(), timeout=timeout, check=False,
        )
        text = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise NodeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n{text}")
        return text

    def stop_app(self) -> None:
        """Stop the broker application; the Erlang node stays (its data too)."""
        self.ctl("stop_app")

    def start_app(self) -> float:
        """Start it again; seconds until the AMQP port answered."""
        began = time.monotonic()
        self.ctl("start_app")
        self.wait_answering()
        return time.monotonic() - began

    def kill(self) -> None:
        """``kill -9`` of the node's beam process (no shutdown at all)."""
        server = self._server
        if server is None or server.poll() is not None:
            raise NodeError(f"node {self.name} is not running")
        pid = int((self.root / "node.pid").read_text().strip() or server.pid)
        os.kill(pid, signal.SIGKILL)
        if pid != server.pid:
            server.kill()
        server.wait(30)
        # The dying beam keeps its listening socket for a moment (a zombie): wait for the
        # port to close, so that "the broker is back" later means the new boot.
        give_up = time.monotonic() + 30
        while answers(self.port) and time.monotonic() < give_up:
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop the node (kill it if it will not stop) and delete its directory."""
        server = self._server
        if server is not None and server.poll() is None:
            try:
                self.ctl("stop", timeout=30)
                server.wait(30)
            except (NodeError, subprocess.TimeoutExpired):
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted((self.root / "log").glob("*.log")) + sorted(self.root.glob("server-*.out"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)
