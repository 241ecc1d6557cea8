"""benchmarks/side_by_side.py: the README's table from a recorded run, and bad --table input."""

from __future__ import annotations

import json
import math
import statistics
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


def test_growth_exponents_alternate_the_two_shapes(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--scaling-only", "--out",
                           str(tmp_path)], text=True, capture_output=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.glob("cpu-scaling-*-quick.json")
    record = json.loads(path.read_text())
    assert [(r["axis"], r["small"]["V"], r["large"]["V"]) for r in record["scaling"]] == \
        [("V", 8192, 16384)] * 2  # fp32, bf16
    for result in record["scaling"]:
        for clock in ("wall", "cpu"):
            samples = result[f"{clock}_s"]
            assert len(samples["small"]) == len(samples["large"]) == 5
            exponents = [math.log2(b / a) for a, b in zip(samples["small"], samples["large"])]
            assert result[f"exponent_{clock}"]["median"] == pytest.approx(
                statistics.median(exponents))


def test_the_goal_grid_pairs_each_shape_with_its_double_v_and_quadruple_n():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import side_by_side

    pairs = {(axis, small.params["dtype"], small.params["N"], small.params["V"],
              large.params["N"], large.params["V"])
             for axis, small, large in side_by_side.scaling_pairs(quick=False)}
    assert pairs == {(axis, dtype, n, v, n * (4 if axis == "N" else 1), v * (2 if axis == "V" else 1))
                     for dtype in ("fp32", "bf16")
                     for axis, n, v in (("V", 1024, 65536), ("V", 4096, 65536),
                                        ("N", 1024, 65536), ("N", 1024, 131072))}
