"""Per-step metrics of a distillation run: loss parts, mixing weights, throughput, memory,
written as JSON lines."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


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
    lines up to the step of its checkpoint (later ones were trained again or never kept).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if not state.is_world_process_zero or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= state.global_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
