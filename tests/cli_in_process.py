"""Run `dscluster ARGS` inside the test process: the parser, handlers and exit codes of
`python -m dscluster` (dscluster.cli.run_command, which `main` calls), without the seconds every new
interpreter spends importing torch. Tests of what a command prints and returns use this; each command
family keeps at least one test through a real `python -m dscluster` process, for the entry point itself.

As in a new process: stdout, stderr and the root logger (which `main` configures) are this call's
own, the environment is exactly `env` when given, the working directory `cwd`, and warnings are
printed to stderr under Python's default filters instead of being collected by pytest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from dataclasses import dataclass


@dataclass
class CliResult:
    """What subprocess.run(..., capture_output=True, text=True) would have returned."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _environment(env: dict[str, str] | None):
    """`env` (default: this one) for the call; what the command sets in it ends with the call."""
    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _own_root_logger():
    """A root logger without handlers, so that `main`'s logging.basicConfig writes to this call's stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, root.level = handlers, level


@contextlib.contextmanager
def _default_warnings():
    """Python's default warning filters, printing to the current sys.stderr."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__", append=True)
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category, append=True)
        warnings.showwarning = (lambda message, category, filename, lineno, file=None, line=None:
                                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
        yield


def run_dscluster(*args: str, env: dict[str, str] | None = None, cwd=None) -> CliResult:
    """For commands that join no process group (not serve, batch, launch or env --check): `main`
    ends a process that joined one, and this process may have, in another test."""
    from dscluster.cli import run_command

    out, err = io.StringIO(), io.StringIO()
    previous_cwd = os.getcwd()
    with _environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            _own_root_logger(), _default_warnings():
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = run_command(list(args))
        except SystemExit as exc:  # argparse: usage errors (2), --help and --version (0)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        finally:
            os.chdir(previous_cwd)
    return CliResult(code, out.getvalue(), err.getvalue())


def write_tiny_model(path, *args: str) -> str:
    """`dscluster tiny-model PATH ARGS` in this process, for fixtures: the model's seed does not move
    this process's random state. tests/test_tiny_model.py runs the command through `python -m dscluster`."""
    import torch

    with torch.random.fork_rng(devices=[]):
        result = run_dscluster("tiny-model", str(path), *args)
    assert result.returncode == 0, result.stderr
    return str(path)
