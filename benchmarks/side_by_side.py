"""Speed side by side: methods alternated round by round in one process, ratios per round.

    python benchmarks/side_by_side.py                  # the CPU goal grid (about an hour)
    python benchmarks/side_by_side.py --quick          # small shapes, a minute
    python benchmarks/side_by_side.py --out DIR        # JSON into DIR (default results/)

A shared machine's load drifts, so timing each method in its own process (bench_kernels.py)
makes its ratios follow the load. Here every case builds its inputs once, warms every method
up (torch.compile compiles there), then runs R >= 5 rounds; each round times forward + backward
of every method once, in an order rotated by the round, and divides each by the plain
PyTorch loss of the same round. Reported: the median, min and max of those per-round ratios
in wall time and in CPU time (all threads), the median seconds, and beside them the matmul
floor (the GEMMs alone) and the bytes-and-FLOPs model's prediction (fastkd/plan.py).

Memory is per process: a fresh subprocess per (case, method) runs one forward + backward and
reports its peak RSS above the inputs ("extra"). The ``rowop`` suite times the C++ row op
against the torch row op on one chunk of logits, the ``logits`` suite ``kd_loss`` on given
logits with each backend.

Growth exponents (time ~ V^a, N^b) come from shapes alternated in one process as well: for
each pair of goal shapes that differ in V (or N) alone, fastkd runs at both, round by round,
and each round gives a = log(t_large / t_small) / log(V_large / V_small)
(``--scaling-only`` runs just these).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cases as C
import torch
from bench_kernels import _proc_status as rss  # noqa: F401 (the memory worker's)
from bench_kernels import _reset_peak_rss as reset_peak  # noqa: F401

HERE = Path(__file__).resolve().parent
MIB = 2**20
ROUNDS = 5

METHODS = {
    "plain": C.plain_vocab,
    "torch.compile(plain)": C.compiled(C.plain_vocab),
    "fastkd cpp": C.fastkd_vocab("cpp"),
    "fastkd torch": C.fastkd_vocab("torch"),
    "matmul floor": C.matmul_floor,
}
LOGIT_METHODS = {
    "plain": C.plain_logits,
    "fastkd cpp": C.fastkd_logits("cpp"),
    "fastkd torch": C.fastkd_logits("torch"),
}


def goal_cases(quick: bool) -> list[C.Case]:
    """The CPU goal grid: N in {1024, 4096}, V in {65,536, 131,072}, H = 512, fp32 and bf16."""
    shapes = [(256, 8192), (256, 16384)] if quick else [
        (1024, 65536), (1024, 131072), (4096, 65536), (4096, 131072)]
    hidden = 128 if quick else 512
    return [C.Case("vocab", f"N={n} V={v} H={hidden} {dtype}",
                   dict(N=n, V=v, Hs=hidden, Ht=hidden, dtype=dtype, T=1.0, beta=0.5,
                        divergence="kl"))
            for dtype in ("fp32", "bf16") for n, v in shapes]


def logit_cases(quick: bool) -> list[C.Case]:
    """kd_loss on given logits, each backend: N = 1024, V = 65,536, fp32."""
    n, v = (256, 16384) if quick else (1024, 65536)
    return [C.Case("logits", f"logits N={n} V={v} fp32",
                   dict(N=n, V=v, dtype="fp32", T=1.0, beta=0.5, divergence="kl"))]


def methods_for(case: C.Case, quick: bool) -> list[str]:
    """Every method at the smallest shape of a dtype; the torch backend and the matmul floor
    only there (they cost a third of the run's time at the larger shapes)."""
    if case.suite == "logits":
        return list(LOGIT_METHODS)
    smallest = quick or (case.params["N"], case.params["V"]) == (1024, 65536)
    return [m for m in METHODS if smallest or m not in ("fastkd torch", "matmul floor")]


def method(case: C.Case, name: str):
    return (LOGIT_METHODS if case.suite == "logits" else METHODS)[name]


def _clear(inputs: C.Inputs) -> None:
    for tensor in C.student_tensors(inputs):
        tensor.grad = None


def alternate(calls: dict[str, Callable[[], object]], rounds: int,
              prepare: Callable[[], None] = lambda: None) -> dict:
    """Per-round wall and CPU seconds of each call: one warm-up call each (compiles, builds the
    extension, faults pages in), then ``rounds`` rounds in an order rotated by the round;
    ``prepare`` runs before every call, untimed."""
    names = list(calls)
    for name in names:
        prepare()
        calls[name]()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            prepare()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            calls[name]()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {"wall_s": wall, "cpu_s": cpu}


def time_case(case: C.Case, names: list[str], rounds: int) -> dict:
    """Per-round wall and CPU seconds of forward + backward of each method, alternated."""
    inputs = C.make_inputs(case, "cpu")
    losses = {name: method(case, name)(inputs, case) for name in names}
    steps = {name: (lambda loss=loss: loss().backward()) for name, loss in losses.items()}
    return alternate(steps, rounds, prepare=lambda: _clear(inputs))


def ratios(samples: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Median / min / max over rounds of method time / reference time in the same round."""
    out = {}
    for name, times in samples.items():
        per_round = [t / ref for t, ref in zip(times, samples[reference])]
        out[name] = {"median": statistics.median(per_round), "min": min(per_round),
                     "max": max(per_round)}
    return out


def predicted_seconds(case: C.Case) -> float:
    """The plan's predicted fastkd fwd+bwd time on the model's CPU machine (fastkd/plan.py)."""
    from fastkd.plan import PLAN_MACHINES, plan_chunks, predict

    p = case.params
    half = p["dtype"] != "fp32"
    plan = plan_chunks(p["V"], 1, "cpp", half, widths=(p["Hs"], p["Ht"]), tokens=p["N"])
    machine = PLAN_MACHINES[("cpu", 2 if half else 4)]
    return predict(plan, p["N"], p["V"], p["Hs"], [p["Ht"]], 2 if half else 4, machine).seconds


MEMORY_WORKER = """
import json, sys
sys.path.insert(0, {here!r})
import torch
import cases as C
import side_by_side as S
torch.set_num_threads({threads})
case = C.Case(**json.loads({case!r}))
inputs = C.make_inputs(case, "cpu")
loss = S.method(case, {name!r})(inputs, case)
before = S.rss("VmRSS")
S.reset_peak()
loss().backward()
print(json.dumps({{"extra_bytes": S.rss("VmHWM") - before}}))
"""


def extra_memory(case: C.Case, name: str) -> int | None:
    """Peak RSS above the inputs of one forward + backward, in a fresh process."""
    code = MEMORY_WORKER.format(here=str(HERE), threads=torch.get_num_threads(), name=name,
                                case=json.dumps({"suite": case.suite, "name": case.name,
                                                 "params": case.params}))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        print(f"  memory of {name} failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]


def rowop_case(rounds: int, quick: bool) -> dict:
    """The C++ row op against the torch row op on one chunk: N=256, V=131,072, fp32, KL."""
    from fastkd.options import KDOptions
    from fastkd.rowops import kd_rows_torch

    rows, vocab = (64, 16384) if quick else (256, 131072)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(rows, vocab, generator=gen) * C.LOGIT_STD
    zt = torch.randn(rows, vocab, generator=gen) * C.LOGIT_STD
    grad = torch.empty_like(z)
    options = KDOptions()
    calls = {
        "torch row op": lambda: kd_rows_torch(z, zt, None, grad, options),
        "C++ row op": lambda: torch.ops.fastkd.kd_rows(z, zt, None, grad, "kl", 0.5, 1.0, 1.0,
                                                        0.0, -100, 0.9, 0.0, 1.0, 0.0, 1.0),
    }
    timed = alternate(calls, rounds)
    wall, cpu = timed["wall_s"], timed["cpu_s"]
    return {"shape": {"N": rows, "V": vocab, "dtype": "fp32", "divergence": "kl"},
            "wall_s": wall, "cpu_s": cpu,
            "speedup_wall": ratios(wall, "C++ row op")["torch row op"],
            "speedup_cpu": ratios(cpu, "C++ row op")["torch row op"]}


def scaling_pairs(quick: bool) -> list[tuple[str, C.Case, C.Case]]:
    """Pairs of goal cases of one dtype that differ in V alone or in N alone."""
    by_shape = {(c.params["dtype"], c.params["N"], c.params["V"]): c for c in goal_cases(quick)}
    pairs = []
    for (dtype, n, v), small in by_shape.items():
        for axis, larger in (("V", (dtype, n, 2 * v)), ("N", (dtype, 4 * n, v))):
            if larger in by_shape:
                pairs.append((axis, small, by_shape[larger]))
    return pairs


def scaling_case(axis: str, small: C.Case, large: C.Case, rounds: int) -> dict:
    """Per-round growth exponents of fastkd cpp's forward + backward from ``small`` to
    ``large`` (the two alternated in one process)."""
    build = METHODS["fastkd cpp"]
    inputs = {"small": C.make_inputs(small, "cpu"), "large": C.make_inputs(large, "cpu")}
    losses = {"small": build(inputs["small"], small), "large": build(inputs["large"], large)}
    steps = {size: (lambda loss=loss: loss().backward()) for size, loss in losses.items()}
    timed = alternate(steps, rounds, prepare=lambda: [_clear(i) for i in inputs.values()])
    growth = math.log(large.params[axis] / small.params[axis])
    result = {"axis": axis, "small": small.params, "large": large.params, **timed}
    for clock in ("wall_s", "cpu_s"):
        exponents = [math.log(b / a) / growth
                     for a, b in zip(timed[clock]["small"], timed[clock]["large"])]
        result[f"exponent_{clock[:-2]}"] = {"median": statistics.median(exponents),
                                            "min": min(exponents), "max": max(exponents)}
    return result


def environment() -> dict:
    from fastkd import csrc

    return {"device": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(), "threads": torch.get_num_threads(),
            "cpu_capability": csrc.cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info
                     if line.startswith("model name")), "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a minute")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds (at least 5)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--scaling-only", action="store_true",
                        help="only the growth exponents (shapes alternated in one process)")
    parser.add_argument("--table", type=Path, metavar="RUN.json",
                        help="print the README's speed table of a recorded run and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        try:
            print(markdown(json.loads(args.table.read_text())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            parser.error(f"--table {args.table}: not a side_by_side.py run "
                         f"({type(error).__name__}: {error})")
        return 0
    if args.rounds < 5:
        parser.error(f"--rounds must be at least 5, got {args.rounds}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    from fastkd import csrc

    if not csrc.load():
        parser.error("the C++ extension did not build: nothing to compare (see the warning)")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = "scaling" if args.scaling_only else "side-by-side"
    path = args.out / f"cpu-{kind}-{stamp}{'-quick' if args.quick else ''}.json"
    record = {"environment": environment(), "rounds": args.rounds, "cases": [], "scaling": []}
    if not args.scaling_only:
        run_cases(record, args, path)
    for axis, small, large in scaling_pairs(args.quick):
        result = scaling_case(axis, small, large, args.rounds)
        record["scaling"].append(result)
        wall, cpu = result["exponent_wall"], result["exponent_cpu"]
        print(f"{small.name} -> {axis}={large.params[axis]}: fastkd time ~ {axis}^"
              f"{wall['median']:.2f} [{wall['min']:.2f}, {wall['max']:.2f}] (cpu "
              f"{cpu['median']:.2f})", flush=True)
        path.write_text(json.dumps(record, indent=1))
    record["environment"]["load_average_end"] = os.getloadavg()
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


def run_cases(record: dict, args: argparse.Namespace, path: Path) -> None:
    """The row-op case, then every loss case, each method alternated; JSON kept after each."""
    record["rowop"] = rowop_case(args.rounds, args.quick)
    speed = record["rowop"]["speedup_wall"]["median"]
    print(f"row op {record['rowop']['shape']}: C++ {speed:.1f}x faster than torch (wall, median)")
    for case in logit_cases(args.quick) + goal_cases(args.quick):
        names = methods_for(case, args.quick)
        print(f"{case.name}: {', '.join(names)}", flush=True)
        result = {"case": case.name, "params": case.params, **time_case(case, names, args.rounds)}
        result["ratio_wall"] = ratios(result["wall_s"], "plain")
        result["ratio_cpu"] = ratios(result["cpu_s"], "plain")
        if case.suite == "vocab":
            result["vs_compile_wall"] = ratios(result["wall_s"], "torch.compile(plain)")
            result["predicted_fastkd_s"] = predicted_seconds(case)
        if not args.no_memory:
            result["extra_mib"] = {name: (None if (b := extra_memory(case, name)) is None
                                          else b / MIB)
                                   for name in names if name != "torch.compile(plain)"}
        record["cases"].append(result)
        _print_case(result)
        path.write_text(json.dumps(record, indent=1))  # kept after every case


def _print_case(result: dict) -> None:
    for name, wall in result["ratio_wall"].items():
        median_s = statistics.median(result["wall_s"][name])
        cpu = result["ratio_cpu"][name]["median"]
        extra = result.get("extra_mib", {}).get(name)
        print(f"  {name:22s} {median_s:8.2f} s  x{wall['median']:.2f} plain "
              f"[{wall['min']:.2f}, {wall['max']:.2f}] (cpu x{cpu:.2f})"
              + (f"  extra {extra:.0f} MiB" if extra is not None else ""))
    if "predicted_fastkd_s" in result:
        print(f"  model's fastkd prediction {result['predicted_fastkd_s']:.2f} s", flush=True)


def markdown(record: dict) -> str:
    """The README's speed table of a recorded run: per case the median per-round ratios of
    fastkd to plain PyTorch and to torch.compile (wall), the seconds, and extra memory."""
    lines = ["| dtype | N | V | plain s | compile s | fastkd s | fastkd / plain | "
             "fastkd / compile | extra MiB plain / fastkd |", "|---|---|---|---:|---:|---:|---:|"
             "---:|---:|"]
    for case in record["cases"]:
        if case["params"].get("Hs") is None:
            continue
        p, wall = case["params"], case["wall_s"]
        extra = case.get("extra_mib", {})
        seconds = {name: statistics.median(times) for name, times in wall.items()}
        lines.append(
            f"| {p['dtype']} | {p['N']} | {p['V']:,} | {seconds['plain']:.2f} | "
            f"{seconds['torch.compile(plain)']:.2f} | {seconds['fastkd cpp']:.2f} | "
            f"{case['ratio_wall']['fastkd cpp']['median']:.2f} | "
            f"{case['vs_compile_wall']['fastkd cpp']['median']:.2f} | "
            f"{_mib(extra.get('plain'))} / {_mib(extra.get('fastkd cpp'))} |")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"  # n/a: run with --no-memory


if __name__ == "__main__":
    sys.exit(main())
