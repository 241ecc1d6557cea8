"""Offline teachers on the embedded demo (`python -m fastkd.distill`): capture the demo's
teacher once (kind hidden, and topk with k in {8, 32, 128}), then train the demo's student
from each capture, beside online KD with the teacher co-resident and CE only.

Recorded: bytes per token and throughput of each capture; held-out perplexity, peak memory
and step time of each student run (each in its own process, so that peak RSS is its own); and
the step's compute (loss, forward and backward) of every method on the same batches, timed
side by side in one process in rounds whose order rotates, as ratios to online KD.

usage: python benchmarks/offline_teachers.py [--scale default|tiny] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from fastkd.distill.capture_signals import write_capture
from fastkd.distill.config import DistillConfig
from fastkd.distill.demo import demo_setup, student_model, train_teacher
from fastkd.distill.evaluate import perplexity
from fastkd.distill.loss import LogitKD
from fastkd.distill.signals import CapturedSignals, CaptureMeta, data_fingerprint
from fastkd.distill.trainer import DistillationTrainer
from fastkd.distill.training import training_arguments

ROOT = Path(__file__).resolve().parent
CAPTURES = {"hidden": ("hidden", 0), "top-128": ("topk", 128), "top-32": ("topk", 32),
            "top-8": ("topk", 8)}
METHODS = ("online KD", *CAPTURES, "CE only")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class RssPeak:
    """The peak resident memory of this process while active, sampled every 5 ms from
    /proc/self/statm (ru_maxrss is the whole process's peak, imports included)."""

    def __enter__(self) -> RssPeak:
        self.start = self.peak = _rss_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_gib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_gib())


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _trainer(method: str, setup, cfg: DistillConfig, work: Path, out: Path,
             callbacks=()) -> Trainer:
    """The demo student's trainer for `method` (a fresh student from the demo's seed)."""
    student = student_model(setup.scale, cfg.seed + 3)
    args = training_arguments(setup.student_cfg, out)
    common = dict(model=student, args=args, data_collator=setup.collator,
                  callbacks=list(callbacks))
    if method == "CE only":
        return Trainer(train_dataset=setup.train, **common)
    kd = LogitKD.from_config(cfg)
    if method == "online KD":
        teacher = AutoModelForCausalLM.from_pretrained(work / "teacher")
        return DistillationTrainer(teachers=[teacher], kd=kd, train_dataset=setup.train, **common)
    train = setup.train.add_column("row_index", list(range(len(setup.train))))
    return DistillationTrainer(teacher_signals=[CapturedSignals(work / method)], kd=kd,
                               train_dataset=train, **common)


def child(method: str, work: Path, scale: str) -> None:
    """Train the demo student with `method`; print its figures as JSON (last line)."""
    cfg = DistillConfig(demo_scale=scale, output_dir=str(work / "runs"))
    setup = demo_setup(cfg)
    timer = StepTimer()
    with RssPeak() as memory:  # the student, the teacher if any, the trainer and its steps
        trainer = _trainer(method, setup, cfg, work, work / "runs" / method, [timer])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    steady = timer.times[len(timer.times) // 5:]  # the first steps warm up
    print(json.dumps({"held_out_ppl": perplexity(trainer.model, setup.held_out, setup.collator),
                      "step_s_median": statistics.median(steady), "train_wall_s": wall,
                      "rss_before_gib": memory.start,
                      "rss_peak_extra_gib": memory.peak - memory.start}))


def side_by_side(setup, cfg: DistillConfig, work: Path, rounds: int) -> dict[str, dict]:
    """Forward + backward of each method's loss on the same batches, in rotated order."""
    trainers = {m: _trainer(m, setup, cfg, work, work / "runs" / "sbs") for m in METHODS[:-1]}
    rows = setup.train.add_column("row_index", list(range(len(setup.train))))
    size = setup.scale.batch_size
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for r in range(rounds + 1):  # round 0 warms up
        batch = setup.collator([rows[i] for i in range(r * size, (r + 1) * size)])
        order = list(trainers)[r % len(trainers):] + list(trainers)[:r % len(trainers)]
        for method in order:
            trainer = trainers[method]
            model = trainer.model.train()
            start = time.perf_counter()
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if r:
                times[method].append(elapsed)
    online = times["online KD"]
    return {m: {"median_s": statistics.median(t),
                "ratio_to_online_median": statistics.median(
                    [a / b for a, b in zip(t, online, strict=True)])}
            for m, t in times.items()}


def parent(scale: str, work: Path, out: Path, rounds: int) -> dict:
    load_start = os.getloadavg()
    cfg = DistillConfig(demo_scale=scale, output_dir=str(work / "runs"))
    setup = demo_setup(cfg)
    teacher = train_teacher(setup, cfg, work / "runs" / "teacher")
    teacher.save_pretrained(work / "teacher")
    teacher_ppl = perplexity(teacher, setup.held_out, setup.collator)
    fingerprint = data_fingerprint(setup.train)
    tokens = sum(len(x) for x in setup.train["input_ids"])
    vocab, width = setup.scale.vocab_size, teacher.config.hidden_size
    captures = {}
    for name, (kind, k) in CAPTURES.items():
        meta = CaptureMeta(
            kind=kind, k=k, dtype="float32" if kind == "topk" else "bfloat16",
            temperatures=[cfg.temperature] if kind == "topk" else [],
            teacher="fastkd demo teacher", teacher_revision=f"seed {cfg.seed}",
            tokenizer="fastkd demo language", vocab_size=vocab, hidden_size=width,
            seq_len=setup.scale.seq_len, packing=True, text_field="input_ids",
            data_fingerprint=fingerprint, rows=len(setup.train), tokens=tokens,
            rows_per_shard=1024)
        report = write_capture(teacher, vocab, setup.train, meta, work / name,
                               batch_size=setup.scale.batch_size)
        captures[name] = {"kind": kind, "k": k, "dtype": meta.dtype,
                          "bytes_per_token": report.bytes_per_token,
                          "tokens_per_s": report.tokens_per_s, "tokens": report.tokens}
    runs = {}
    for method in METHODS:
        print(f"\n[offline_teachers] training the student: {method}", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", method, "--work", str(work),
                               "--scale", scale], capture_output=True, text=True, check=True)
        runs[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(runs[method], flush=True)
    sbs = side_by_side(setup, cfg, work, rounds)
    result = {
        "what": "fastkd demo: offline teachers (captures) vs online KD and CE only",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "device": "cpu"},
        "scale": scale, "vocab": vocab, "teacher_hidden": width, "train_tokens": tokens,
        "student_steps": setup.scale.student_steps, "teacher_held_out_ppl": teacher_ppl,
        "bayes_floor_ppl": setup.floor, "captures": captures, "runs": runs,
        "side_by_side_rounds": rounds, "side_by_side": sbs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    """The README's table of a recorded run."""
    lines = ["| student trained from | bytes / token | held-out ppl | step s | step compute "
             "vs online | peak extra RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        run = result["runs"][method]
        size = result["captures"].get(method, {}).get("bytes_per_token")
        ratio = result["side_by_side"].get(method, {}).get("ratio_to_online_median")
        lines.append(f"| {method} | {'' if size is None else f'{size:.0f}'} | "
                     f"{run['held_out_ppl']:.2f} | {run['step_s_median']:.3f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{run['rss_peak_extra_gib'] * 1024:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="default", choices=("default", "tiny"))
    parser.add_argument("--work", help="folder for the teacher, captures and runs "
                        "(default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "results" / "cpu-offline-teachers.json"))
    parser.add_argument("--rounds", type=int, default=10, help="side-by-side rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if args.child:
        child(args.child, Path(args.work), args.scale)
        return
    with tempfile.TemporaryDirectory() as tmp:
        parent(args.scale, Path(args.work or tmp), Path(args.out), args.rounds)


if __name__ == "__main__":
    main()
