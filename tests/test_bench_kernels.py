"""benchmarks/bench_kernels.py: where --out writes, missing modules named before any work, and
output that speaks of the project's goals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_kernels  # noqa: E402


def test_out_folder_gets_a_stamped_file(tmp_path):
    path = bench_kernels.results_path(tmp_path, "cpu")
    assert path.parent == tmp_path and re.fullmatch(r"cpu-\d{8}-\d{6}\.json", path.name)
    assert bench_kernels.results_path(tmp_path / "new", "cuda").parent == tmp_path / "new"
    (tmp_path / "a.json").mkdir()
    assert bench_kernels.results_path(tmp_path / "a.json", "cpu").parent == tmp_path / "a.json"
    assert bench_kernels.results_path(tmp_path / "r.json", "cpu") == tmp_path / "r.json"
    assert bench_kernels.results_path(None, "cpu").parent == BENCH / "results"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        bench_kernels.results_path(tmp_path / "file" / "r.json", "cpu")


def _bench(*argv: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    code = ("import sys, runpy\n"
            f"for name in {block!r}: sys.modules[name] = None\n"
            f"sys.argv = ['bench_kernels.py', *{list(argv)!r}]\n"
            f"runpy.run_path({str(BENCH / 'bench_kernels.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("block, argv, message", [
    (("tqdm",), ("--no-plots",), "tqdm not installed: pip install 'fastkd[bench]'\n"),
    (("matplotlib",), (), "matplotlib not installed: pip install 'fastkd[bench]', or pass "
                          "--no-plots\n"),
])
def test_missing_bench_modules_are_named_before_any_check(block, argv, message):
    start = time.perf_counter()
    done = _bench("--quick", *argv, block=block)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.endswith(message) and "Traceback" not in done.stderr, done.stderr
    assert "correctness" not in done.stdout  # nothing was checked or timed
    assert time.perf_counter() - start < 60


def test_output_speaks_of_the_project_not_of_issues():
    source = (BENCH / "bench_kernels.py").read_text() + (BENCH / "cases.py").read_text()
    assert not re.search(r"\bissue", source, re.IGNORECASE)


def test_memory_goal_line(capsys):
    bench_kernels.print_memory_figure({"case": "memory N=1024", "fastkd_extra_bytes": 2**20,
                                       "torch_extra_bytes": 10 * 2**20, "ratio": 0.1,
                                       "goal": 0.15, "pass": True})
    assert capsys.readouterr().out.strip() == (
        "memory goal (memory N=1024, fwd+bwd): fastkd extra 1 MiB / torch extra 10 MiB = "
        "10.0% (goal < 15%: PASS)")
