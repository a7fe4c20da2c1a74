"""`make bench`'s ingest benchmark still works: a tiny run against all three receivers, cleaned up after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import require_tool

REPO = Path(__file__).resolve().parents[2]
BENCH_DEADLINE_SECONDS = 120


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
@pytest.mark.dcmtk
def test_ingest_bench_measures_every_receiver_and_mode_and_leaves_nothing_behind(tmp_path: Path) -> None:
    for name in ("storescu", "storescp", "echoscu", "Orthanc"):
        require_tool(name)
    out = tmp_path / "ingest.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ingest.py"), "--runs", "1", "--slices", "8", "--size", "64",
         "--out", str(out), "--work-dir", str(scratch)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=BENCH_DEADLINE_SECONDS,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "TCP_NODELAY=1" in output
    report = json.loads(out.read_text())
    measured = {(r["receiver"], r["mode"]) for r in report["results"] if len(r["runs"]) == 1}
    assert measured == {(n, m) for n in ("edge-node", "storescp", "orthanc") for m in ("single", "4 senders")}
    assert set(report["ratios"]["single"]) == {"edge-node/storescp", "edge-node/orthanc"}
    assert report["senders"]["env"] == {"TCP_NODELAY": "1"}
    assert list(scratch.iterdir()) == [], "the bench left temporary files"
    assert _processes_mentioning(str(scratch)) == [], "the bench left processes running"
