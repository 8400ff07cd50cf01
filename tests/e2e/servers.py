"""A real `dscluster serve` in a subprocess on a free loopback port, for end-to-end tests.

Like vLLM's tests/utils.py RemoteOpenAIServer: start the command, wait for /health/ready, hand out
clients, and stop it (SIGTERM, then SIGKILL for the whole process group if it does not go).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx

from dscluster.cluster.launch import free_port


def poll_ready(url: str, running: Callable[[], bool], timeout: float, path: str = "/health/ready") -> bool:
    """True once `url` + `path` answers 200; False when `running()` turns False or time is up.
    Any other answer (503 while the model loads) or none at all means: not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running():
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


class RemoteServer:
    def __init__(self, model: str, *args: str, nproc: int = 2, env: dict[str, str] | None = None,
                 ready_timeout: float = 240.0, program: str | None = None):
        """`program`: a Python file that runs dscluster's command line (a fault injected first),
        started on every rank by the local launcher instead of `python -m dscluster`."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="dscluster-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "dscluster", "serve", model, "--nproc", str(nproc),
               "--port", str(self.port), *args]
        if program is not None:
            cmd = [sys.executable, "-m", "dscluster", "launch", "--nproc", str(nproc), "--",
                   sys.executable, program, "serve", model, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:  # a test timeout interrupting the wait must not leave the server running
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        if poll_ready(self.url, lambda: self.proc.poll() is None, timeout):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited {self.proc.returncode} before ready:\n{self.output()[-4000:]}")
        self.kill()
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def openai(self, api_key: str = "unused"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the launcher (it forwards to every rank); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        os.unlink(self.log.name)


def assert_every_rank_exits_2(procs: list[subprocess.Popen], message: str, timeout: float = 100) -> None:
    """Each rank's process (stderr piped, text) exits 2 with exactly one `dscluster: error:` line
    naming `message`, and no traceback: a usage error is told the same way on every rank."""
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=timeout)
        errors = [line for line in err.splitlines() if line.startswith("dscluster: error:")]
        assert proc.returncode == 2, f"rank {rank}: exit {proc.returncode}\n{err[-3000:]}"
        assert len(errors) == 1 and message in errors[0], f"rank {rank}:\n{err[-3000:]}"
        assert "Traceback" not in err
