"""The soak, short: bench/soak.py for 10 seconds with a few clients of every protocol at
once against a `mailsrv serve`, on each database; any message lost or duplicated, or any
unexpected reply, fails it (bench/soak.py prints the exact account)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_short_soak_loses_and_duplicates_nothing(db_url):
    database = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--seconds", "10", "--database", database,
         "--posters", "4", "--readers", "4", "--smtp", "2", "--submission", "1"],
        capture_output=True, text=True, timeout=400,  # (on PostgreSQL, a schema of its own)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = re.search(r"accepted (\d+), delivered (\d+), lost (\d+), duplicated (\d+), errors (\d+)(.*)", result.stdout)
    assert summary, result.stdout
    accepted, delivered, lost, duplicated, errors = map(int, summary.groups()[:5])
    assert accepted > 100 and delivered == accepted, result.stdout
    assert (lost, duplicated, errors, summary.group(6)) == (0, 0, 0, ""), result.stdout
