#!/usr/bin/env python3
"""Run the compatibility suite (tests/test_compat.py) and write the README's "Works with" table
from what it ran: one row per stack, its packages at the versions installed, and its result.

Run: .venv/bin/python scripts/compat_table.py [--check]
  --check  only say whether the README's table lists every stack of the suite (no tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- compat:begin -->", "<!-- compat:end -->"


def suite() -> list[dict]:
    """The suite's stacks, each with its packages at their installed versions (tests/test_compat.py)."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "test_compat.py")], capture_output=True, text=True,
                         check=True, cwd=ROOT / "tests")
    return json.loads(out.stdout)


def results() -> dict[str, str]:
    """Each stack's result: passed, failed or skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", os.environ.get("DURABLE_TEST_WORKERS", "2"),
                        str(ROOT / "tests" / "test_compat.py"), f"--junitxml={report}"], cwd=ROOT)
        outcome = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "")
            stack = name[name.index("[") + 1 : -1] if "[" in name else name
            failed = case.find("failure") is not None or case.find("error") is not None
            outcome[stack] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
        return outcome


def table(stacks: list[dict], outcome: dict[str, str]) -> str:
    lines = ["| stack | packages | crash after a paid tool call, resumed with `durable run` |", "|---|---|---|"]
    for stack in stacks:
        result = outcome.get(stack["name"], "not run")
        mark = "0 extra calls, same output, 0 divergences" if result == "passed" else f"**{result}**"
        packages = ", ".join(f"{name} {version}" for name, version in stack["packages"].items())
        lines.append(f"| {stack['name']} | {packages} | {mark} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    found = suite()
    text = README.read_text()
    head, _, rest = text.partition(BEGIN)
    current, _, tail = rest.partition(END)
    if args.check:
        missing = [s["name"] for s in found if f"| {s['name']} |" not in current]
        print("missing from the README's table: " + ", ".join(missing) if missing else "the table lists every stack")
        sys.exit(1 if missing else 0)
    new = table(found, results())
    README.write_text(f"{head}{BEGIN}\n{new}\n{END}{tail}")
    print(new)


if __name__ == "__main__":
    main()
