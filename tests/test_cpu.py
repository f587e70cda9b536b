"""mailsrv.cpu: threads kept on one CPU, and the threads for long work without the GIL on
all of them. Run in a child process, so that the test process itself is never pinned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mailsrv import cpu

CHILD = """
import json, os, threading
from mailsrv import cpu
allowed = sorted(os.sched_getaffinity(0))
pinned = cpu.pin_to_one_cpu()
seen = {}
def later_thread():
    seen["started"] = sorted(os.sched_getaffinity(0))
    cpu.use_every_cpu()
    seen["widened"] = sorted(os.sched_getaffinity(0))
thread = threading.Thread(target=later_thread)
thread.start()
thread.join()
seen["main"] = sorted(os.sched_getaffinity(0))
seen["allowed_cpus"] = sorted(cpu.allowed_cpus())
print(json.dumps({"allowed": allowed, "pinned": pinned, **seen}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pinned_threads_and_every_cpu():
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(result.stdout)
    one = [seen["pinned"]]
    assert seen["pinned"] == max(seen["allowed"])
    assert seen["started"] == one  # a thread started later inherits it
    assert seen["widened"] == seen["allowed"] == seen["allowed_cpus"]
    assert seen["main"] == one  # (only the calling thread was widened)


def test_nothing_changes_unless_pinned():
    before = os.sched_getaffinity(0)
    cpu.use_every_cpu()
    assert os.sched_getaffinity(0) == before == cpu.allowed_cpus()
