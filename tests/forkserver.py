"""Start ``dag.test()`` runs in processes of their own, forked from one that has Airflow loaded.

A fresh Python process takes about 10 s of CPU before its task sends anything (importing Airflow,
then building the in-process Execution API that ``dag.test()`` reports to, every API version of
it), twice that when two start at once on two cores. A test that needs a run in a process of its
own (to ``kill -9`` it, or to run two at once) gets one forked from a server process that did
that work once, as Airflow's LocalExecutor forks its workers from a process that has Airflow
loaded. The forked process is a process like any other: it has its own pid, can be killed with
SIGKILL at any instant, and reads the environment (connections) of the test that started it.

The server is single-threaded when it forks (the Execution API's event loop thread starts in the
child, on its first request), and SQLAlchemy's pooled connections are dropped in the child by
Airflow's own at-fork hook.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

#: The server: warms up, then forks a child per request line (JSON: dag_id, run_conf, env) and
#: answers a line with the child's pid, and one with its exit code once it has exited.
_SERVER = r"""
import json, os, select, signal, sys

try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow 3.1
    from airflow.models.dagbag import DagBag


def warm_up():
    # Everything here only saves time: a child does whatever is left undone.
    import airflow.sdk.execution_time.task_runner  # noqa: F401
    import airflow.sdk.definitions.dag  # noqa: F401
    import airflow.models.dagrun  # noqa: F401
    import airflow_provider_stripe_meter.operators.meter_event_batch  # noqa: F401
    import airflow_provider_stripe_meter.hooks.stripe  # noqa: F401
    import stripe  # noqa: F401
    from airflow.sdk.execution_time.supervisor import in_process_api_server

    sys.path.insert(0, sys.argv[1])  # the repository, for the tests package
    from tests.execution_api import build_for_the_newest_version_only

    build_for_the_newest_version_only()  # as in the test process (see tests/execution_api.py)
    app = in_process_api_server().app  # builds the app; its event loop thread starts later
    if hasattr(app, "_cadwyn_initialize") and not getattr(app, "_cadwyn_initialized", True):
        app._cadwyn_initialize()  # its routes, built on the first request otherwise


try:
    warm_up()
except Exception as err:  # an Airflow without one of these: the children do it themselves
    print(json.dumps({"warm_up_failed": repr(err)}), file=sys.stderr, flush=True)

out = os.fdopen(os.dup(1), "w", buffering=1)
children = set()
buffer = b""


def answer(message):
    out.write(json.dumps(message) + "\n")
    out.flush()


def run_child(request):
    # What the run prints goes to a log of its own, for a test that fails to be read.
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.environ.clear()
    os.environ.update(request["env"])
    bag = DagBag(dag_folder=request["dag_folder"])
    bag.get_dag(request["dag_id"]).test(run_conf=request["run_conf"])


while True:
    readable, _, _ = select.select([0], [], [], 0.02 if children else None)
    if readable:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                out.close()
                run_child(request)  # an exception ends the child with 1, as python -c does
                sys.exit(0)
            children.add(pid)
            answer({"pid": pid})
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            answer({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
"""


class ForkedRun:
    """A run in a forked process: the parts of :class:`subprocess.Popen` the tests use."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self._server = server
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with self._server.cond:
            self.returncode = self._server.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._server.cond:
            ended = self._server.cond.wait_for(
                lambda: self.pid in self._server.exits or self._server.gone, timeout
            )
            if not ended:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            if self.pid not in self._server.exits:
                raise RuntimeError("the fork server ended before its child")
            self.returncode = self._server.exits[self.pid]
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class ForkServer:
    """One server process per test process, started on the first run asked for."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(Path(__file__).resolve().parent.parent)],
            env=os.environ.copy(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.cond = threading.Condition()
        self.exits: dict[int, int] = {}
        self.gone = False
        self._pids: list[int] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="forkserver-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.cond:
                if "pid" in message:
                    self._pids.append(message["pid"])
                else:
                    self.exits[message["exit"]] = message["code"]
                self.cond.notify_all()
        with self.cond:
            self.gone = True
            self.cond.notify_all()

    def spawn(self, dag_id: str, run_conf: dict[str, Any], env: dict[str, str], dag_folder: str) -> ForkedRun:
        """Fork a process that runs ``dag_id`` of ``dag_folder`` (a file or folder) with
        ``dag.test(run_conf=...)`` in ``env``."""
        assert self.proc.stdin is not None
        with self._lock:  # one request at a time: its pid is the next one answered
            with self.cond:
                before = len(self._pids)
            log = os.path.join(env.get("AIRFLOW_HOME", "/tmp"), f"forked-{dag_id}-{len(self._pids)}.log")
            request = {"dag_id": dag_id, "dag_folder": dag_folder, "run_conf": run_conf, "env": env}
            request["log"] = log
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            with self.cond:
                if not self.cond.wait_for(lambda: len(self._pids) > before or self.gone, 600):
                    raise RuntimeError("the fork server did not answer")
                if self.gone and len(self._pids) == before:
                    raise RuntimeError("the fork server ended")
                pid = self._pids[before]
        return ForkedRun(self, pid, [dag_id])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_server: ForkServer | None = None
_server_lock = threading.Lock()


def fork_server() -> ForkServer:
    """This process's fork server (started on first use, with this process's environment)."""
    global _server
    with _server_lock:
        if _server is None or _server.gone:
            _server = ForkServer()
        return _server


def close_fork_server() -> None:
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None


atexit.register(close_fork_server)
