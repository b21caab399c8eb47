"""Process lifetime under a launcher (gem_fast/distributed.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_worker_exits_when_its_launcher_is_killed(tmp_path):
    # launcher -> worker; SIGKILL the launcher: the worker gets SIGTERM (PR_SET_PDEATHSIG) and ends.
    worker = ("import time; from gem_fast.distributed import exit_with_launcher; "
              "print(exit_with_launcher(), flush=True); time.sleep(60)")
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {worker!r}], stdout=subprocess.PIPE, text=True)
        print(child.pid, child.stdout.readline().strip(), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    pid, armed = proc.stdout.readline().split()
    assert armed == "True"
    proc.kill()
    proc.wait()
    for _ in range(100):  # the orphan is reparented; poll its /proc entry until it is gone
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        subprocess.run(["sleep", "0.1"])
    else:
        os.kill(int(pid), signal.SIGKILL)
        pytest.fail("the worker outlived its launcher")
