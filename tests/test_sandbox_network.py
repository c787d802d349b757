"""Sandbox networking (issue 17), run in a pytest process of its own.

The cases (tests/sandbox_network_cases.py) enter a network namespace with setns(2), which
moves only the calling thread.  The stock E2B SDK's HTTP client does its I/O on worker
threads that live as long as the process: in a process where an earlier test used the SDK,
those threads stay in the machine's namespace and find nothing listening there (seen in the
full suite: every case "connection refused").  A fresh process makes every thread after the
switch.  Its whole report is shown when a case fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_sandbox_networking_cases_in_a_process_of_their_own() -> None:
    _cases("sandbox_network_cases.py")


def test_sandbox_egress_accounting_cases_in_a_process_of_their_own() -> None:
    _cases("sandbox_accounting_cases.py")


def test_sandbox_dns_and_gateway_abuse_cases_in_a_process_of_their_own() -> None:
    _cases("sandbox_dns_cases.py")


def _cases(name: str) -> None:
    # --show-capture=no: a failure shows its assertion, not the thousand log lines before it
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                          "--show-capture=no", str(HERE / name)], cwd=HERE.parent, capture_output=True, text=True,
                         timeout=1800, env=os.environ.copy())
    summary = res.stdout.strip().splitlines()[-1:] or ["no output"]
    print(f"{name}: {summary[0]}")
    assert res.returncode == 0, res.stdout[-12000:] + res.stderr[-3000:]
    assert " passed" in summary[0] and "failed" not in summary[0] and "error" not in summary[0], summary
