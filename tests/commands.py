"""Run a child command from a test so that a timeout can never leave processes behind.

``subprocess.run`` kills only the child it started: the Python stages a runner script launches keep running, and
while they hold the captured pipes ``run`` waits for them, so one slow test hangs the whole suite. Here the child
gets its own process group and a timeout kills the group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

DEFAULT_TIMEOUT_S = 600


def run(command: list[str], *, timeout: float = DEFAULT_TIMEOUT_S, check: bool = False, **kwargs: Any):
    """``subprocess.run(command, timeout=timeout, check=check, **kwargs)``, killing the child's whole process group.

    Accepts ``capture_output``, ``text``, ``env``, ``cwd`` and the other ``Popen`` arguments.
    """
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(command, start_new_session=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            raise
        except BaseException:
            _kill_group(process)
            raise
        finally:
            _kill_group(process)  # stray grandchildren of a finished child, too
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
