"""The README's commands and the administrator's queries stay true."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_starts_with_the_two_commands():
    server, tests = readme_commands()[:2]
    assert "mailsrv -c mailsrv.conf serve" in server and "pip install" in server
    assert tests.endswith("pytest") and "'.[test]'" in tests


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_schema_readme_queries_run(store, accounts, database):
    """Every query in schema/README.md runs on this database."""
    queries = re.findall(r"```sql\n(.+?)\n```", (ROOT / "schema" / "README.md").read_text(), re.S)
    assert len(queries) >= 6
    since = datetime(2000, 1, 1, tzinfo=UTC)
    params = {"since": since.replace(tzinfo=None) if database.dialect == "sqlite" else since}
    params["before"] = params["since"]
    store.queue.enqueue("ann@example.org", b"x\r\n", ["bob@example.org"], "mpp")
    for block in queries:
        for statement in filter(None, (s.strip() for s in block.split(";"))):
            with database.write() as s:
                s.execute(text(statement), {k: v for k, v in params.items() if f":{k}" in statement})


def test_the_design_is_in_the_repository_and_every_reference_resolves():
    """docs/design.md is the project's account of its design: nothing refers to a design
    document outside the repository, and every file or folder the docs name exists."""
    sources = [ROOT / "README.md", ROOT / "docs" / "design.md", ROOT / "bench" / "README.md",
               *ROOT.glob("mailsrv/**/*.py"), *ROOT.glob("bench/*.py")]
    named = set()
    for path in sources:
        text = path.read_text()
        assert "DESIGN.md" not in text and "../" not in text.replace("../..", ""), path
        named |= set(re.findall(r"(?<![/\w])((?:mailsrv|docs|bench|tests|schema|scripts)/[\w.*-][\w./*-]*\w)", text))
    missing = [name for name in sorted(named) if not any(ROOT.glob(name))]
    assert not missing
    assert len(named) >= 20
