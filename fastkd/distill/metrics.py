"""Per-step metrics of a distillation run: loss parts, mixing weights, throughput, memory,
written as JSON lines."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class StepMeter:
    """Accumulates token-weighted metrics between two log events and turns them into a dict."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counted = 0.0
        self._tokens = 0
        self._since = time.perf_counter()

    def add_tokens(self, n_input_tokens: int) -> None:
        """Count the (non-padding) input tokens of a micro-batch for tokens/s."""
        self._tokens += n_input_tokens

    def add(self, counted: float, sums: dict[str, float]) -> None:
        """Add per-token sums over `counted` label tokens (averaged at `flush`)."""
        self._counted += counted
        for key, value in sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def flush(self) -> dict[str, float]:
        """Averages since the last flush, tokens/s and peak memory; resets the meter."""
        now = time.perf_counter()
        out = {k: v / max(self._counted, 1.0) for k, v in self._sums.items()}
        out["tokens_per_s"] = self._tokens / max(now - self._since, 1e-9)
        out.update(_memory())
        self.__init__()
        return out


def _memory() -> dict[str, float]:
    """Peak GPU memory since the last call (GiB) on CUDA, else peak process RSS (GiB)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return {"gpu_mem_peak_gib": peak}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"cpu_rss_peak_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


class JsonlLogger(TrainerCallback):
    """Appends each log event of the main process to `path` as one JSON object per line.

    The file holds one run's history: a fresh run starts it empty, and a resumed run keeps the
    lines up to the step of its checkpoint (later ones were trained again or never kept). A
    line cut short by a killed process (the last one, as a rule) is dropped with a warning.

    Step lines carry `step` (the optimizer step just done) and the Trainer's `loss` (the mean
    over the steps since the previous line) with the meter's averages. At the end of each
    training session (a fresh run, or each resume) the Trainer's summary comes as one line with
    `"summary": true`: its `step` is the last step reached, `resumed_from_step` the step the
    session started from (0 for a fresh run), and its `train_loss` the mean loss over that
    session's steps only (`resumed_from_step` + 1 to `step`), not over the whole run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._start_step = state.global_step
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = [line for line in self._readable_lines()
                if json.loads(line)["step"] <= state.global_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def _readable_lines(self) -> list[str]:
        """The file's lines that hold a JSON object with a step; others are dropped, noted."""
        kept, dropped = [], []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    kept.append(line)
                    continue
            except ValueError:
                pass
            if line.strip():
                dropped.append(number)
        if dropped:
            logger.warning("%s: dropped %d unreadable line(s) (%s; cut short by a killed "
                           "process?)", self.path, len(dropped),
                           ", ".join(f"line {n}" for n in dropped[:5]))
        return kept

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **logs}
        if "train_runtime" in logs:  # the Trainer's end-of-training summary
            record = {"step": state.global_step, "summary": True,
                      "resumed_from_step": self._start_step, **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
