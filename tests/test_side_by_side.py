"""benchmarks/side_by_side.py: the README's table from a recorded run, and bad --table input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "side_by_side.py"
RUN = ROOT / "benchmarks" / "results" / "cpu-side-by-side-20261203-080049.json"


def table(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--table", str(path)], text=True,
                          capture_output=True, timeout=300, cwd=ROOT)


def test_the_readme_table_is_the_recorded_runs():
    done = table(RUN)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.strip().splitlines()
    assert len(rows) == 2 + 8
    readme = (ROOT / "README.md").read_text()
    assert all(row in readme for row in rows)


@pytest.mark.parametrize("content", ["not json", "{}", "[1, 2]", '{"cases": [{"params": {"Hs": 1}}]}'])
def test_a_file_that_is_no_run_is_one_line(tmp_path, content):
    path = tmp_path / "run.json"
    path.write_text(content)
    done = table(path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("side_by_side.py: error: --table")
    assert "Traceback" not in done.stderr
