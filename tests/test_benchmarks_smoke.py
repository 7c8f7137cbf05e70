"""The benchmark harness runs end to end and writes well-formed results.

Only the harness and its output format are checked, never a figure: timings on a shared
CI machine mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytest.importorskip("psutil")
pytest.importorskip("matplotlib")

SECTIONS = ("s1", "s2", "s3", "s4", "s5", "s6", "peer")


@pytest.mark.slow
def test_smoke_run_writes_table_chart_and_raw_figures(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    markdown = (tmp_path / "bench.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Benchmark results (smoke")
    for heading in ("## 1. Throughput", "## 2. Throughput", "## 3. Realistic load", "## 4. Capacity",
                    "## 5. Slow consumers", "## 6. Redis stream store", "## Peer"):
        assert heading in markdown
    for fact in ("- Date: ", "- Machine: ", "- Python ", "uvicorn ", "- Pinning: "):
        assert fact in markdown
    tables = [line for line in markdown.splitlines() if line.startswith("|")]
    assert tables and all(line.endswith("|") for line in tables)

    png = (tmp_path / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    raw = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert [s["key"] for s in raw["sections"]] == list(SECTIONS)
    assert raw["machine"]["cores"] >= 1 and raw["machine"]["python"]
    by_key = {s["key"]: s for s in raw["sections"]}
    for key in ("s1", "s2"):
        gateway, floor = by_key[key]["data"]["measured"][:2]
        assert (gateway["target"], floor["target"]) == ("gateway", "floor: FastAPI")
        assert gateway["completed"] == gateway["streams"] and not gateway["errors"]
        assert gateway["tokens"] == floor["tokens"] > 0
    # Every stream completed with its tokens; notes about the machine (a busy load
    # generator, CPU stolen by the host) may stand beside that.
    for row in by_key["s3"]["rows"]:
        assert all(note == "ok" or note.startswith(("load generator", "the host took"))
                   for note in row[-1].split("; ")), row
    assert all(row[6].split("/")[0] == row[6].split("/")[1] for row in by_key["s4"]["rows"])
