"""Side-by-side benchmark of fastkd's losses against what a user would otherwise write.

    python benchmarks/bench_kernels.py                 # CPU-sized default here, headline on GPU
    python benchmarks/bench_kernels.py --quick         # one small case per suite (memory left out)
    python benchmarks/bench_kernels.py --only vocab    # suites: vocab logits multi_teacher
                                                       #         attention memory

Per case and method: a float64-oracle check at a small shape, median time with spread
(forward under no_grad, and forward + backward), peak and extra memory, TFLOP/s and the ratio
to the suite's reference row (the measured matmul floor, or SDPA for attention). Each
(case, method) runs in its own subprocess, so memory peaks and allocator state never leak
between them. Results go to a table on stdout, ``benchmarks/results/<stamp>.json`` and PNG
plots next to it (``plot_results.py``). See benchmarks/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import cases as C
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MIB = 2**20
WORKER_TIMEOUT_S = 600
CPU_MIN_SAMPLES, CPU_MIN_TIME_S, CPU_MAX_SAMPLES = 2, 1.5, 20
GPU_WARMUP_MS, GPU_REP_MS = 100, 1000


# ---------------------------------------------------------------------------------------------
# The cases of a run


def _case(suite: str, sweep: str, dtype: str, **params) -> C.Case:
    """A case named by its sizes; ``sweep`` names the parameter its plot puts on the x axis."""
    params = {"dtype": dtype, "T": 1.0, "beta": 0.5, "divergence": "kl", "sweep": sweep,
              **params}
    shown = [f"{k}={v}" for k, v in params.items()
             if k in C.SIZE_KEYS]
    label = f"{suite} {' '.join(shown)} {dtype}"
    if suite in ("vocab", "logits", "memory"):
        label += f" {params['divergence']}"
    modes = ("fwd+bwd",) if suite == "memory" else ("fwd", "fwd+bwd")
    return C.Case(suite, label, params, modes)


def gpu_cases(quick: bool) -> list[C.Case]:
    """The headline shape of docs/design.md section 6 and the sweeps around it."""
    head = dict(N=8192, V=128256, Hs=2048, Ht=4096)
    # the attention goal's shape: one sequence, 32 heads of dim 128 on both sides, causal
    attn = dict(B=1, H=32, Hkv=32, Ds=128, Dt=128, causal=True, loss="mse")
    if quick:
        return [_case("vocab", "V", "bf16", **head),
                _case("logits", "V", "bf16", N=8192, V=128256),
                _case("multi_teacher", "K", "bf16", K=2, **{**head, "N": 4096}),
                _case("attention", "L", "bf16", L=4096, **attn)]
    out = [_case("vocab", "V", "bf16", **{**head, "V": v}) for v in (32000, 128256, 151936, 256000)]
    out.append(_case("vocab", "V", "bf16", divergence="jsd", **head))
    out += [_case("vocab", "N", "bf16", **{**head, "N": n}) for n in (1024, 4096, 16384)]
    out += [_case("vocab", "Hs", "bf16", **{**head, "Hs": hs, "Ht": 2 * hs})
            for hs in (1024, 4096)]
    out += [_case("vocab", "dtype", dt, **head) for dt in ("fp16", "fp32")]
    out += [_case("logits", "V", "bf16", N=8192, V=v, divergence=d)
            for v in (32000, 128256) for d in ("kl", "jsd")]
    out += [_case("multi_teacher", "K", "bf16", K=k, **{**head, "N": 4096}) for k in (1, 2, 3, 4)]
    out.append(_case("multi_teacher", "N", "bf16", K=3, **head))  # multi-teacher goal: K=3
    # L=16384: the materialized maps (32 GiB each in fp32) do not fit; fastkd's do not exist
    out += [_case("attention", "L", "bf16", L=length, **attn) for length in (1024, 4096, 16384)]
    out.append(_case("attention", "L", "bf16", L=4096, **{**attn, "Hkv": 8, "Ds": 64,
                                                          "loss": "kl"}))  # GQA, dims differ
    return out


def cpu_cases(quick: bool) -> list[C.Case]:
    """Shapes that finish in a few minutes on two CPU cores, fp32 (bf16 GEMMs are slow on CPU)."""
    attn = dict(B=1, H=8, Hkv=2, Ds=32, Dt=64, causal=True, loss="mse")
    if quick:
        return [_case("vocab", "V", "fp32", N=256, V=16384, Hs=128, Ht=256),
                _case("logits", "V", "fp32", N=256, V=16384),
                _case("multi_teacher", "K", "fp32", K=2, N=128, V=16384, Hs=128, Ht=256),
                _case("attention", "L", "fp32", L=256, **attn)]
    return [
        # the CPU memory goal: extra peak of fwd+bwd under 15% of the materializing loss
        _case("memory", "V", "fp32", N=1024, V=65536, Hs=128, Ht=128),
        *[_case("vocab", "V", "fp32", N=256, V=v, Hs=128, Ht=256) for v in (8192, 16384, 32768)],
        _case("vocab", "V", "fp32", N=256, V=32768, Hs=128, Ht=256, divergence="jsd"),
        _case("logits", "V", "fp32", N=256, V=32768),
        *[_case("multi_teacher", "K", "fp32", K=k, N=256, V=16384, Hs=128, Ht=256)
          for k in (1, 2, 4)],
        _case("attention", "L", "fp32", L=512, **attn),
    ]


# ---------------------------------------------------------------------------------------------
# Measuring one (case, method) in a worker process


def _proc_status(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _clear_grads(inputs: C.Inputs) -> None:
    for tensor in C.student_tensors(inputs):
        tensor.grad = None


def _step(loss_fn: C.LossFn, inputs: C.Inputs, mode: str) -> Callable[[], None]:
    """One call of the mode: the loss under no_grad, or the loss and its backward."""
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                loss_fn()
    else:
        def run() -> None:
            _clear_grads(inputs)
            loss_fn().backward()
    return run


def _memory_and_time(run: Callable[[], None], inputs: C.Inputs, device: str) -> dict:
    """Peak / extra memory of one call, then the time of repeated calls."""
    _clear_grads(inputs)
    gc.collect()
    if device == "cpu":
        before = _proc_status("VmRSS")
        _reset_peak_rss()
        start = time.perf_counter()
        run()
        samples = [time.perf_counter() - start]  # each CPU call maps fresh memory: a fair sample
        peak = _proc_status("VmHWM")
        while len(samples) < CPU_MAX_SAMPLES and (
            len(samples) < CPU_MIN_SAMPLES or sum(samples) < CPU_MIN_TIME_S
        ):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
        ms = sorted(1e3 * s for s in samples)
        return {"peak_bytes": peak, "extra_bytes": peak - before, "median_ms": _quantile(ms, .5),
                "p20_ms": _quantile(ms, .2), "p80_ms": _quantile(ms, .8), "samples_ms": ms}
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    median, p20, p80 = triton.testing.do_bench(run, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS,
                                               quantiles=[0.5, 0.2, 0.8])
    return {"peak_bytes": peak, "extra_bytes": peak - before, "median_ms": median,
            "p20_ms": p20, "p80_ms": p80}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


def worker(task: dict) -> dict:
    """Run one method on one case: every mode, memory first, then timing."""
    device = task["device"]
    case = C.Case(**task["case"])
    method = next(m for m in C.METHODS[case.suite] if m.name == task["method"])
    inputs = C.make_inputs(case, device)
    out: dict = {"input_bytes": C.input_bytes(inputs), "modes": {}}
    loss_fn = method.build(inputs, case)
    for mode in case.modes:
        run = _step(loss_fn, inputs, mode)
        try:
            run()  # warm-up: lazy init, autotuning, torch.compile
            out["modes"][mode] = {"status": "ok", **_memory_and_time(run, inputs, device)}
        except Exception as error:  # noqa: BLE001 - reported per mode, the run goes on
            status = "OOM" if _is_oom(error) else "error"
            out["modes"][mode] = {"status": status, "reason": f"{type(error).__name__}: "
                                                              f"{str(error)[:300]}"}
            _clear_grads(inputs)
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def run_worker(case: C.Case, method: C.Method, device: str) -> dict:
    """Measure in a fresh subprocess; a killed or timed-out worker becomes a status."""
    task = {"device": device, "method": method.name,
            "case": {"suite": case.suite, "name": case.name, "params": case.params,
                     "modes": list(case.modes)}}
    env = dict(os.environ)
    if device == "cpu":  # every block >= 64 KiB is mmapped and unmapped on free: honest RSS peaks
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return _failed(case, "timeout", f"worker ran past {WORKER_TIMEOUT_S} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    if proc.returncode in (-9, 137):
        return _failed(case, "OOM", "worker killed (SIGKILL), most likely out of memory")
    return _failed(case, "error", (proc.stderr.strip().splitlines() or ["no output"])[-1][:300])


def _failed(case: C.Case, status: str, reason: str) -> dict:
    return {"modes": {mode: {"status": status, "reason": reason} for mode in case.modes}}


# ---------------------------------------------------------------------------------------------
# The run: checks, measurements, table, JSON


def environment(device: str) -> dict:
    """Device name and versions, recorded with every result."""
    import triton

    info = {
        "device": device,
        "device_name": (torch.cuda.get_device_name() if device == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    try:
        info["liger_kernel"] = version("liger-kernel")
    except PackageNotFoundError:
        info["liger_kernel"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, text=True,
                                            capture_output=True).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    if device == "cpu":
        with open("/proc/cpuinfo") as cpuinfo:
            names = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
        info["device_name"] = names[0] if names else info["device_name"]
    return info


def check_all(cases: list[C.Case], device: str) -> dict[tuple[str, str], dict]:
    """Oracle check of every method at each distinct small shape, before anything is timed."""
    checks: dict[tuple[str, str], dict] = {}
    done: dict[str, dict] = {}
    for case in cases:
        for method in C.METHODS[case.suite]:
            skip = method.available(case, device)
            if not method.checked or (skip is not None and not skip.checkable):
                continue
            small = C.check_case(case)
            key = json.dumps([method.name, small.suite, small.params], sort_keys=True)
            if key not in done:
                tol = C.tolerance(case.dtype)
                try:
                    with warnings.catch_warnings():  # interpreter: inf - inf in masked lanes
                        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                                module="triton")
                        err = C.check_method(method, case, device)
                    done[key] = {"rel_err": err, "tol": tol, "pass": err <= tol}
                except Exception as error:  # noqa: BLE001 - a crashing method fails its check
                    done[key] = {"rel_err": None, "tol": tol, "pass": False,
                                 "reason": f"{type(error).__name__}: {str(error)[:200]}"}
                result = done[key]
                verdict = "pass" if result["pass"] else "FAIL"
                err_text = ("crashed: " + result["reason"] if result["rel_err"] is None
                            else f"rel err {result['rel_err']:.2e} (tol {tol:.0e})")
                print(f"  check {verdict}  {method.name:<26} {small.name}: {err_text}")
            checks[(case.name, method.name)] = done[key]
    return checks


def measure_all(cases: list[C.Case], device: str, checks: dict) -> list[dict]:
    """Every available (case, method) in its own worker, with a progress bar."""
    from tqdm import tqdm

    records = []
    todo = []
    for case in cases:
        record = {"suite": case.suite, "name": case.name, "params": case.params,
                  "flops": {mode: C.flops(case, mode) for mode in case.modes},
                  "model": C.predicted(case, device), "methods": []}
        records.append(record)
        for method in C.METHODS[case.suite]:
            skip = method.available(case, device)
            entry = {"method": method.name, "check": checks.get((case.name, method.name))}
            if skip is not None:
                entry.update(status="skipped", reason=skip.reason)
            else:
                entry["status"] = "ok"
                todo.append((case, method, entry))
            record["methods"].append(entry)
    for case, method, entry in tqdm(todo, desc="measuring", unit="run", file=sys.stderr):
        result = run_worker(case, method, device)
        entry.update(result)
    for record in records:
        _derive(record)
    return records


def _derive(record: dict) -> None:
    """TFLOP/s, ratio to the reference row, extra memory relative to the materializing loss."""
    by_name = {m["method"]: m for m in record["methods"]}
    ref = by_name.get(C.REFERENCE_METHOD.get(record["suite"], ""), {})
    base = by_name.get(C.BASELINE_METHOD, {})
    for method in record["methods"]:
        for mode, figures in method.get("modes", {}).items():
            if figures.get("status") != "ok":
                continue
            seconds = figures["median_ms"] / 1e3
            flop = record["flops"][mode]
            figures["tflops"] = flop / seconds / 1e12 if flop else None
            ref_mode = ref.get("modes", {}).get(mode, {})
            figures["x_ref"] = (figures["median_ms"] / ref_mode["median_ms"]
                                if ref_mode.get("status") == "ok" else None)
            base_mode = base.get("modes", {}).get(mode, {})
            figures["extra_vs_torch"] = (
                figures["extra_bytes"] / base_mode["extra_bytes"]
                if base_mode.get("status") == "ok" and base_mode["extra_bytes"] > 0 else None)


def memory_figure(records: list[dict]) -> dict | None:
    """The CPU memory goal: fastkd's extra peak memory (fwd+bwd) under 15% of the
    materializing loss's, on CPU's default backend (cpp; torch where the extension is absent)."""
    for record in records:
        if record["suite"] != "memory":
            continue
        by_name = {m["method"]: m.get("modes", {}).get("fwd+bwd", {}) for m in record["methods"]}
        ours = by_name.get("fastkd cpp", {})
        if ours.get("status") != "ok":
            ours = by_name.get("fastkd torch", {})
        plain = by_name.get(C.BASELINE_METHOD, {})
        if ours.get("status") != "ok" or plain.get("status") != "ok":
            return {"case": record["name"], "ratio": None, "goal": 0.15, "pass": False}
        ratio = ours["extra_bytes"] / plain["extra_bytes"]
        return {"case": record["name"], "fastkd_extra_bytes": ours["extra_bytes"],
                "torch_extra_bytes": plain["extra_bytes"], "ratio": ratio, "goal": 0.15,
                "pass": ratio < 0.15}
    return None


# ---------------------------------------------------------------------------------------------
# Output


def _ms(figures: dict) -> str:
    if figures.get("status") != "ok":
        return figures.get("status", "-")
    spread = (figures["p80_ms"] - figures["p20_ms"]) / 2 / figures["median_ms"] * 100
    return f"{figures['median_ms']:9.2f} ±{spread:3.0f}%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(records: list[dict], env: dict) -> None:
    """One block per case: a row per method, fwd and fwd+bwd side by side."""
    print(f"\ndevice: {env['device_name']} ({env['device']}, {env['cpu_threads']} CPU threads)  "
          f"torch {env['torch']}  triton {env['triton']}  python {env['python']}")
    if env["device"] == "cpu" and env["load_average_1min"] > env["cpu_count"]:
        print(f"warning: load average {env['load_average_1min']:.1f} on {env['cpu_count']} CPUs "
              "at the start: other processes share the cores, CPU times are noisy and slow")
    head = (f"{'method':<27}{'check':>10}{'fwd ms':>16}{'fwd+bwd ms':>16}{'TFLOP/s':>9}"
            f"{'x ref':>7}{'peak MiB':>10}{'extra MiB':>10}{'x torch':>8}")
    for record in records:
        flop = record["flops"].get("fwd+bwd")
        ref = C.REFERENCE_METHOD.get(record["suite"], "-")
        print(f"\n== {record['name']}  (fwd+bwd {flop / 1e12:.3g} TFLOP; x ref: {ref})"
              if flop else f"\n== {record['name']}  (memory-bound: no FLOP figure)")
        if record.get("model"):
            model = record["model"]
            print(f"   model ({model['machine']}): fastkd fwd+bwd {model['fwd+bwd_ms']:.1f} ms, "
                  f"floor {model['floor_ms']:.1f} ms; plan {model['rows']} rows, "
                  f"{model['grad_rows']} gradient rows")
        print(head)
        skipped = []
        for method in record["methods"]:
            check = method.get("check")
            check_text = ("-" if check is None else "crash" if check["rel_err"] is None
                          else f"{'ok' if check['pass'] else 'FAIL'} {check['rel_err']:.0e}")
            if method["status"] == "skipped":
                skipped.append(f"   {method['method']}: {method['reason']}")
                if check is None:
                    continue
            modes = method.get("modes", {})
            fwd, both = modes.get("fwd", {}), modes.get("fwd+bwd", {})
            mem = both if both.get("status") == "ok" else fwd
            name = method["method"] + (" !" if check and not check["pass"] else "")
            print(f"{name:<27}{check_text:>10}{_ms(fwd) if fwd else '-':>16}"
                  f"{_ms(both) if both else 'skipped':>16}"
                  f"{_num(both.get('tflops'), '.2f'):>9}{_num(both.get('x_ref'), '.2f'):>7}"
                  f"{_num(mem.get('peak_bytes', 0) / MIB or None, '.0f'):>10}"
                  f"{_num(mem.get('extra_bytes', 0) / MIB or None, '.0f'):>10}"
                  f"{_num(mem.get('extra_vs_torch'), '.2f'):>8}")
        for line in skipped:
            print("  skipped:" + line)
        for method in record["methods"]:
            for mode, figures in method.get("modes", {}).items():
                if figures.get("status") not in (None, "ok"):
                    print(f"  {figures['status']}: {method['method']} {mode}: {figures['reason']}")


def print_memory_figure(figure: dict | None) -> None:
    if figure is None:
        return
    if figure["ratio"] is None:
        print(f"\nmemory goal ({figure['case']}): not measured (a method failed)")
        return
    print(f"\nmemory goal ({figure['case']}, fwd+bwd): fastkd extra "
          f"{figure['fastkd_extra_bytes'] / MIB:.0f} MiB / torch extra "
          f"{figure['torch_extra_bytes'] / MIB:.0f} MiB = {figure['ratio']:.1%} "
          f"(goal < 15%: {'PASS' if figure['pass'] else 'MISS'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one small case per suite (memory left out)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="a suite (vocab, logits, multi_teacher, attention, memory) or a "
                             "piece of a case name such as V=32768; repeatable")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path,
                        help="a .json file, or a folder to write <device>-<stamp>.json into "
                             "(default: benchmarks/results/)")
    parser.add_argument("--compile-cpu", action="store_true",
                        help="also time torch.compile on CPU (slow to build)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    missing = missing_modules(plots=not args.no_plots)
    if missing:  # before minutes of checks, not after them
        plots_only = missing == ["matplotlib"]
        parser.exit(2, f"bench_kernels.py: error: {', '.join(missing)} not installed: pip "
                       "install 'fastkd[bench]'" + (", or pass --no-plots" if plots_only else "")
                    + "\n")
    try:
        out = results_path(args.out, args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.device == "cpu":  # before triton is imported: the oracle checks of the triton backend
        os.environ.setdefault("TRITON_INTERPRET", "1")

    cases = gpu_cases(args.quick) if args.device == "cuda" else cpu_cases(args.quick)
    if args.compile_cpu:
        cases = [C.Case(c.suite, c.name, {**c.params, "compile_cpu": True}, c.modes)
                 for c in cases]
    cases = _select(cases, args.only)
    if not cases:
        parser.error(f"--only {args.only}: no case matches")
    env = environment(args.device)
    print(f"fastkd benchmark on {env['device_name']} ({args.device}): {len(cases)} cases")
    if args.device == "cpu":
        print("CPU run: fastkd's torch and cpp backends are timed (the triton backend needs a "
              "GPU; on CPU it runs in the interpreter, checked for correctness only); "
              "benchmarks/side_by_side.py gives the CPU speed ratios")
    print("correctness against the float64 oracle (small odd shapes):")
    checks = check_all(cases, args.device)
    records = measure_all(cases, args.device, checks)
    figure = memory_figure(records)
    print_table(records, env)
    print_memory_figure(figure)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "memory_figure": figure, "cases": records},
                              indent=1))
    print(f"\nwrote {out}")
    if not args.no_plots:
        from plot_results import plot

        for path in plot(out):
            print(f"wrote {path}")
    return 0


def missing_modules(plots: bool) -> list[str]:
    """The modules of the bench extra a run needs but this environment lacks."""
    needed = ["tqdm"] + (["matplotlib"] if plots else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def results_path(out: Path | None, device: str) -> Path:
    """Where the JSON goes: `out` itself when it names a .json file that is not a folder, else
    `<device>-<stamp>.json` inside the folder `out` (default: benchmarks/results/)."""
    name = f"{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if out is None:
        return RESULTS / name
    if out.is_dir() or out.suffix != ".json":
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file but not a .json one")
        return out / name
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a folder")
            break
    return out


def _select(cases: list[C.Case], only: list[str] | None) -> list[C.Case]:
    """Cases of the named suites, or whose name contains one of the strings."""
    if not only:
        return cases
    return [c for c in cases if any(o == c.suite or o in c.name for o in only)]


if __name__ == "__main__":
    sys.exit(main())
