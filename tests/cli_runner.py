"""The real command line, run in processes forked from one warm interpreter (shared by the whole test session).

Starting Python and importing torch, Pyro, Lightning, scikit-learn and matplotlib takes several seconds of CPU, and
dozens of tests run ``python -m pyro_lvm.experiments[.X] ARGS``. :class:`WarmCLI` starts one interpreter (the
*server*, :data:`SERVER`) that makes those imports once and then, for each request, forks a child that changes to
the request's working directory, points its stdin at ``/dev/null`` and its stdout and stderr at files, and runs the
module as ``__main__`` with :mod:`runpy`, as ``python -m`` does (or a script, as ``python PATH`` does); the child's
exit status is the command's. Each child starts from the server's state: imports made, nothing run, nothing seeded
(children never change the server).

What a child sees differs from ``python -m`` only in what the server imported first (the experiment modules
themselves are not imported: runpy runs each afresh as ``__main__``) and in skipping the interpreter's exit hooks
(``os._exit``): ``tests/test_faults.py::test_forked_runs_match_fresh_interpreters`` runs cases both ways and checks
they print the same, tests/test_resume.py's Ctrl-C test that a fresh interpreter trains to the same numbers as
a forked one, and tests/test_two_nodes.py has a forked node and a fresh one train together. The Ctrl-C test starts
a fresh interpreter of its own. (The server imports the library once, when the session starts: a library file
edited while the suite runs may not be seen.)

A request may add variables to the child's environment (``env``: the rendezvous of a data-parallel run, say),
set in ``os.environ`` before the module runs. Variables that act only when the interpreter starts or a module is
imported cannot differ from the server's (:data:`STARTUP_ONLY`: refused), except ``PYTHONWARNINGS``, whose
filters the child installs before the module runs (ahead of any the server's imports installed).

The server is a fresh interpreter (its own hash seed), started with SIGINT at its default (a suite started in the
background inherits SIGINT ignored), ``OMP_NUM_THREADS=1`` and ``MPLBACKEND=Agg``; it never runs torch itself, so
forking it is safe. Requests are served one at a time, in order; :meth:`WarmCLI.submit` returns at once, so a test
can do other work (an in-process run to compare with) while its child runs.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

#: a child still running after this long is taken to hang (a guard, not a speed requirement): it is killed
HANG_GUARD_S = 900

#: environment variables read only at the interpreter's start or when torch, numpy or matplotlib are imported: a
#: forked child cannot take another value than the server's (see the module doc)
STARTUP_ONLY = ("PYTHONPATH", "PYTHONHASHSEED", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONDONTWRITEBYTECODE",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND")

SERVER = textwrap.dedent("""
    import json, os, runpy, sys, traceback

    # the heavy imports, once; not the experiment modules themselves (runpy runs each afresh as __main__)
    import pyro_lvm, pyro_lvm.experiments.cli, pyro_lvm.harness  # noqa: E401,F401
    import matplotlib.figure, sklearn.datasets, sklearn.decomposition, sklearn.mixture  # noqa: E401,F401

    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed by the server itself goes to its stderr, never into the replies


    def send(**msg):
        reply.write(json.dumps(msg) + "\\n")
        reply.flush()


    def child(req):
        code = 1
        try:
            os.chdir(req["cwd"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if req["append"] else os.O_TRUNC)
            os.dup2(os.open(req["stdout"], mode, 0o644), 1)
            os.dup2(1 if req["stderr"] == req["stdout"] else os.open(req["stderr"], mode, 0o644), 2)
            reply.close()
            env = req.get("env") or {}
            os.environ.update(env)
            if "PYTHONWARNINGS" in env:  # read by the interpreter at its start: install its filters as it would
                import warnings

                opts = [o for o in env["PYTHONWARNINGS"].split(",") if o]
                sys.warnoptions[:] = opts
                warnings._processoptions(opts)
            try:
                if req["path"]:  # python PATH ARGS
                    sys.argv = [req["path"], *req["args"]]
                    sys.path.insert(0, os.path.dirname(req["path"]))
                    runpy.run_path(req["path"], run_name="__main__")
                else:  # python -m MODULE ARGS
                    sys.argv = [req["module"], *req["args"]]
                    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # as the interpreter does: None is 0, a message is printed and is 1
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


    send(ready=os.getpid())
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        send(id=req["id"], pid=pid)
        send(id=req["id"], status=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    os._exit(0)  # no request left: skip the interpreter's teardown (seconds, with torch loaded)
""")


def fresh_env() -> dict[str, str]:
    """The environment of the server and of the tests' own fresh interpreters."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "MPLBACKEND": "Agg"}


def sigint_default() -> None:
    """``preexec_fn``: SIGINT back to its default in the child (``pytest &`` starts the suite with it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Pending:
    """A submitted command: :meth:`result` waits for it; :meth:`poll`, :meth:`send_signal` and :meth:`wait` as on a
    :class:`subprocess.Popen`."""

    def __init__(self, cli: WarmCLI, rid: str, cmd: list[str], stdout: Path, stderr: Path) -> None:
        self.cli, self.id, self.args, self.stdout, self.stderr = cli, rid, cmd, stdout, stderr
        self.returncode: int | None = None
        self._done: subprocess.CompletedProcess | None = None

    @property
    def pid(self) -> int:
        """The child's process id (once the server has forked it: requests before it may still be running)."""
        return self.cli._get(self.id, "pid", HANG_GUARD_S)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.cli._get(self.id, "status", None)
        return self.returncode

    def wait(self, timeout: float = HANG_GUARD_S) -> int:
        if self.returncode is None:
            self.returncode = self.cli._get(self.id, "status", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def result(self, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
        if self._done is None:
            status = self.wait(timeout)
            self._done = subprocess.CompletedProcess(self.args, status, self.stdout.read_text(),
                                                     self.stderr.read_text())
        return self._done


class WarmCLI:
    """The warm interpreter's client (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.root / "server.stderr", "w")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=fresh_env(), cwd=self.root, text=True,
                                      preexec_fn=sigint_default)
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._seen: dict[str, dict[str, Any]] = {}
        self._next = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)  # the server is gone

    def _server_died(self) -> str:
        self._log.flush()
        return f"the warm interpreter exited: {(self.root / 'server.stderr').read_text()[-3000:]}"

    def submit(self, module: str, args: list[str] | tuple[str, ...], cwd: str | Path | None = None, *,
               stdout: str | Path | None = None, stderr: str | Path | None = None, append: bool = False,
               script: str | Path | None = None, env: dict[str, str] | None = None) -> Pending:
        """Start ``python -m module *args`` (``python script *args`` if ``script`` is given; ``module`` is then
        ignored) forked, in ``cwd`` (default: a new directory); its stdout and stderr go to the files ``stdout`` and
        ``stderr`` (default: beside the server's log; the same file for both if they are the same path), truncated
        or, with ``append``, appended to, and come back in the result. ``env``: variables added to the child's
        environment (not one of :data:`STARTUP_ONLY` with another value than the server's)."""
        env = {str(k): str(v) for k, v in (env or {}).items()}
        server_env = fresh_env()
        differ = [k for k in STARTUP_ONLY if k in env and env[k] != server_env.get(k)]
        if differ:
            raise ValueError(f"a forked child cannot change {differ}: they act at the interpreter's start "
                             "(run a fresh interpreter instead)")
        with self._lock:
            self._next += 1
            rid = str(self._next)
        if cwd is None:
            cwd = tempfile.mkdtemp(prefix=f"cwd{rid}.", dir=self.root)
        out = Path(stdout) if stdout is not None else self.root / f"{rid}.stdout"
        err = Path(stderr) if stderr is not None else self.root / f"{rid}.stderr"
        req = {"id": rid, "module": module, "args": [str(a) for a in args], "cwd": str(Path(cwd).resolve()),
               "stdout": str(out.resolve()), "stderr": str(err.resolve()), "append": append,
               "path": str(Path(script).resolve()) if script is not None else None, "env": env}
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(self._server_died()) from None
        cmd = [sys.executable, req["path"]] if script is not None else [sys.executable, "-m", module]
        return Pending(self, rid, [*cmd, *req["args"]], out, err)

    def run(self, module: str, args: list[str] | tuple[str, ...], cwd: str | Path | None = None, *,
            timeout: float = HANG_GUARD_S, **files: Any) -> subprocess.CompletedProcess:
        """``python -m module *args`` in ``cwd``, forked; returns when it has exited."""
        return self.submit(module, args, cwd, **files).result(timeout)

    def _get(self, rid: str, key: str, timeout: float | None) -> Any:
        """``key`` (``pid`` or ``status``) of request ``rid``, waiting up to ``timeout`` seconds for it (``None``:
        not at all; then ``None`` if it is not known yet). A child that does not exit in time is taken to hang: it
        is killed, so that the server serves the next request, and TimeoutError is raised."""
        import time

        deadline = time.monotonic() + (timeout or 0)
        while key not in self._seen.get(rid, {}):
            try:
                msg = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01)) if timeout is not None \
                    else self._lines.get_nowait()
            except queue.Empty:
                if timeout is None:
                    return None
                pid = self._seen.get(rid, {}).get("pid")
                if pid is not None and key == "status":
                    os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"request {rid} gave no {key} within {timeout} s (killed)") from None
            if msg is None:
                self._lines.put(None)  # for the next waiter too
                raise RuntimeError(self._server_died())
            if "id" in msg:
                self._seen.setdefault(msg["id"], {}).update(msg)
        return self._seen[rid][key]

    def close(self) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._log.close()
