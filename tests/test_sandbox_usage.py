"""The parser of a sandbox's usage sample (sandbox/usage.py), on what the guest's tools print;
the SDK's get_metrics() against a real sandbox is in test_sandbox_service.py."""

from __future__ import annotations

import pytest

from cubefs.errors import CubefsError
from sandbox.usage import parse

OUT = """cpu  1000 0 500 8000 100 0 10 0 0 0
cpu  1030 0 545 8020 105 0 10 0 0 0
2
MemTotal:         250000 kB
MemAvailable:     150000 kB
Buffers:            1000 kB
Cached:            40000 kB
/dev/root        1000000 400000 600000  40% /
"""


def test_a_sample_is_what_the_guest_said() -> None:
    s = parse(OUT, 1.5e9)
    # 30 user + 45 system of 100 ticks (20 idle, 5 iowait): 75 % of the two vCPUs
    assert (s.cpu_count, s.cpu_pct) == (2, 75.0)
    assert (s.mem_total, s.mem_used, s.mem_cache) == (250000 * 1024, 100000 * 1024, 41000 * 1024)
    assert (s.disk_total, s.disk_used) == (1000000, 400000)
    doc = s.api()
    assert doc["timestampUnix"] == 1500000000 and doc["timestamp"].startswith("2017-07-14T02:40:00")


def test_output_that_is_not_the_scripts_is_an_error_not_a_zero() -> None:
    for bad in ("", "cpu 1 2\n", OUT.replace("MemAvailable", "MemFree")):
        with pytest.raises(CubefsError, match="could not be read"):
            parse(bad, 0.0)
