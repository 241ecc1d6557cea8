"""Plots of a benchmark JSON: time and extra memory against the swept size, one PNG per sweep.

    python benchmarks/plot_results.py benchmarks/results/cpu-20250101-120000.json

Each (suite, sweep) with at least two sizes gives ``<json stem>-<suite>-<sweep>.png``: median
forward + backward time (left) and extra peak memory (right) of every method, log-log.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE = "fwd+bwd"


def _series(cases: list[dict], axis: str) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(x, median ms, extra MiB)] over the cases, measured points only."""
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for case in cases:
        for method in case["methods"]:
            figures = method.get("modes", {}).get(MODE, {})
            if figures.get("status") == "ok":
                series[method["method"]].append(
                    (case["params"][axis], figures["median_ms"], figures["extra_bytes"] / 2**20))
    return series


def plot(json_path: Path) -> list[Path]:
    """Write the PNGs of one results file next to it; returns their paths."""
    results = json.loads(Path(json_path).read_text())
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for case in results["cases"]:
        axis = case["params"].get("sweep")
        if axis and isinstance(case["params"].get(axis), (int, float)):
            groups[(case["suite"], axis)].append(case)
    env = results["environment"]
    written = []
    for (suite, axis), cases in groups.items():
        if len({c["params"][axis] for c in cases}) < 2:
            continue
        # one sweep varies only `axis`: keep the cases that share the first case's other params
        first = {k: v for k, v in cases[0]["params"].items() if k != axis}
        cases = [c for c in cases if {k: v for k, v in c["params"].items() if k != axis} == first]
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, points in sorted(_series(cases, axis).items()):
            points.sort()
            xs = [p[0] for p in points]
            ax_time.plot(xs, [p[1] for p in points], marker="o", label=name)
            ax_mem.plot(xs, [p[2] for p in points], marker="o", label=name)
        panels = ((ax_time, f"{MODE} median time (ms)"), (ax_mem, "extra peak memory (MiB)"))
        for ax, label in panels:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize=8)
        fixed = ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("sweep", "T", "beta"))
        fig.suptitle(f"{suite} vs {axis} on {env['device_name']} ({fixed})", fontsize=9)
        fig.tight_layout()
        path = Path(json_path).with_name(f"{Path(json_path).stem}-{suite}-{axis}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot a fastkd benchmark JSON.")
    parser.add_argument("json", type=Path)
    for path in plot(parser.parse_args().json):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
