"""Running a command that starts processes of its own, bounded in time.

`subprocess.run(..., capture_output=True, timeout=...)` kills only the process it started.
Lightning's subprocess launcher and spawned ranks are that process's children: killed on
timeout, it leaves them running with the output pipes open, and `subprocess.run` then waits
for those pipes to close, without a bound (a hung launch held a test run for good). Here the
command runs in a session of its own, and the whole session is killed on timeout, and once
the command has exited (anything left of it is an orphan).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence


#: How often a running command is checked for having exited.
_POLL_S = 1.0


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left of it
        pass


def run_command(args: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)`, with
    every process the command started killed on timeout or once the command has exited."""
    proc = subprocess.Popen(
        list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:  # returns once the pipes close (retrying loses no output)
                out, err = proc.communicate(timeout=_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if proc.poll() is not None:  # exited, an orphan of it holds the pipes
                    _kill_session(proc.pid)
                    out, err = proc.communicate()
                    break
                if time.monotonic() > deadline:
                    _kill_session(proc.pid)
                    out, err = proc.communicate()
                    raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    finally:
        _kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
