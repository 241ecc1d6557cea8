"""`fastkd capture`: run the teacher(s) once over the training data of a distillation config
and write their signals to disk (`fastkd.distill.signals` describes the format).

The token blocks are those `fastkd distill` trains on (`run.token_blocks`: the same
tokenization, packing, seq_len and order). Shard i holds blocks [i R, (i + 1) R); under
torchrun / accelerate process p of P writes the shards i with i % P == p. A shard is written to
a temporary name and renamed, so an interrupted capture rerun with the same settings skips the
shards already on disk and writes each missing one once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from .capture import final_hidden
from .config import DistillConfig, check_writable_dir
from .data import CausalCollator
from .heads import Head, logit_transform, output_head, vocab_rows
from .models import check_seq_len, existing, load_config, load_model
from .run import _teacher_dtype, model_sources, teacher_sources, token_blocks
from .signals import (
    HEAD_FILE,
    CaptureMeta,
    data_fingerprint,
    missing_shards,
    tokenizer_identity,
    write_head,
    write_shard,
)
from .vocab import teacher_rows

logger = logging.getLogger(__name__)

# tokens per logits chunk of a topk capture: chunk x V fp32 logits stay near 256 MiB
_LOGIT_CHUNK_BYTES = 1 << 28


@dataclass
class CaptureReport:
    """What one teacher's capture wrote (this process's part of it, timed)."""

    folder: Path
    tokens: int  # tokens written by this process in this session
    seconds: float
    bytes_per_token: float  # on disk, the whole capture (shards and head)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def run_capture(cfg: DistillConfig) -> list[CaptureReport]:
    """Capture every teacher of `cfg` (one folder each) over its training data."""
    if not cfg.teachers or cfg.data is None or cfg.capture_out is None:
        raise ValueError("fastkd capture needs teachers, data and --out (capture_out)")
    kind = cfg.capture_kind
    if kind == "hidden" and cfg.capture_temperatures is not None:
        raise ValueError("capture_temperatures is for kind topk; a hidden capture serves every "
                         "temperature")
    check_writable_dir(cfg.capture_out, "capture_out (--out)")
    sources = teacher_sources(cfg)
    student = None if cfg.student is None else model_sources(cfg)[0]
    for role, path in [*(("teacher", t.name) for t in sources), ("data", cfg.data),
                       ("tokenizer", cfg.tokenizer),
                       ("student", None if student is None else student.name)]:
        if path is not None:
            existing(path, role)
    for source in sources:
        check_seq_len(load_config(source, "teacher"), cfg.seq_len, "teacher")
    tokenizer, blocks, _ = token_blocks(cfg, cfg.tokenizer or student or sources[0],
                                        "student" if student else "teacher")
    student_rows = None if student is None else \
        load_config(student, "student").get_text_config().vocab_size
    identity, fingerprint = tokenizer_identity(tokenizer), data_fingerprint(blocks)
    state = process_state()
    out = Path(cfg.capture_out)
    reports = []
    for k, (source, entry) in enumerate(zip(sources, cfg.teacher_entries, strict=True)):
        folder = out if len(sources) == 1 else out / f"teacher{k}"
        path = source.name
        teacher = load_model(source, "teacher", _teacher_dtype(cfg, entry))
        softcap, scale = logit_transform(teacher, path)
        rows = teacher_rows(student_rows or vocab_rows(teacher), vocab_rows(teacher),
                            len(tokenizer), path)
        if kind == "topk" and not 1 <= cfg.capture_k <= rows:
            raise ValueError(f"capture_k must be in [1, {rows}] (the vocabulary rows), got "
                             f"{cfg.capture_k}")
        meta = CaptureMeta(
            kind=kind, k=cfg.capture_k if kind == "topk" else 0,
            dtype=cfg.capture_dtype or ("float32" if kind == "topk" else "bfloat16"),
            temperatures=(cfg.capture_temperatures or [cfg.temperature]) if kind == "topk"
            else [],
            teacher=str(Path(path).resolve()), teacher_revision=_revision(teacher, path),
            tokenizer=identity,
            vocab_size=rows, hidden_size=teacher.config.get_text_config().hidden_size,
            seq_len=cfg.seq_len, packing=cfg.packing, text_field=cfg.text_field,
            data_fingerprint=fingerprint, rows=len(blocks),
            tokens=sum(len(x) for x in blocks["input_ids"]),
            rows_per_shard=cfg.capture_rows_per_shard,
            teacher_softcap=softcap, teacher_logit_scale=scale,
        )
        reports.append(write_capture(teacher, rows, blocks, meta, folder, cfg.batch_size,
                                     state))
        del teacher
    return reports


def write_capture(
    teacher: torch.nn.Module, rows: int, blocks: Any, meta: CaptureMeta, folder: Path,
    batch_size: int, state: PartialState | None = None,
) -> CaptureReport:
    """Capture `teacher` (the first `rows` rows of its lm_head) over `blocks` (token blocks
    with `input_ids`) into `folder`, resuming a capture of the same `meta` found there.

    Args:
        batch_size: token blocks per teacher forward.
        state: the process layout (default: `process_state()`).
    """
    state = state or process_state()
    _start(folder, meta, state)
    teacher.to(state.device).eval().requires_grad_(False)
    head = output_head(teacher, rows)
    if meta.kind == "hidden" and state.is_main_process and not (folder / HEAD_FILE).is_file():
        write_head(folder, head)
    return _capture_teacher(teacher, head, blocks, meta, folder, batch_size, state)


def process_state() -> PartialState:
    """accelerate's process layout: under torchrun / accelerate launch, one process group
    (gloo where there is no GPU), else one process."""
    if torch.cuda.is_available():
        return PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=True, **({"backend": "gloo"} if launched else {}))


def _revision(teacher: torch.nn.Module, path: str) -> str:
    """The hub commit of the teacher when known, else a sha256 of its local config.json and
    the names and sizes of its weight files."""
    commit = getattr(teacher.config, "_commit_hash", None)
    if commit:
        return str(commit)
    root = Path(path)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for weights in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return "local-sha256:" + digest.hexdigest()[:16]


def _start(folder: Path, meta: CaptureMeta, state: PartialState) -> None:
    """Create the capture folder with its metadata, or check that an existing one holds a
    capture of the same settings (which is then resumed)."""
    if state.is_main_process:
        if (folder / "capture.json").is_file():
            differ = CaptureMeta.read(folder).differences(meta)
            if differ:
                raise ValueError(f"--out {str(folder)!r} holds a capture with other settings "
                                 f"({', '.join(differ)} differ); choose another --out or "
                                 "delete it")
            done = meta.shards - len(missing_shards(folder, meta))
            print(f"fastkd capture: resuming {folder}: {done} of {meta.shards} shards on disk")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            meta.write(folder)
        for stale in folder.glob(".*.tmp"):  # left by a killed process; nobody writes yet
            stale.unlink()
    state.wait_for_everyone()


@torch.no_grad()
def _capture_teacher(
    teacher: torch.nn.Module, head: Head, blocks: Any, meta: CaptureMeta, folder: Path,
    batch_size: int, state: PartialState,
) -> CaptureReport:
    """Write this process's missing shards of one teacher's capture."""
    mine = [i for i in missing_shards(folder, meta) if i % state.num_processes ==
            state.process_index]
    per_shard = meta.rows_per_shard
    todo = sum(len(x) for i in mine
               for x in blocks[i * per_shard:(i + 1) * per_shard]["input_ids"])
    collate = CausalCollator(pad_token_id=0)
    bar = tqdm(total=todo, unit="tok", unit_scale=True, desc=f"capture {meta.kind} {folder}",
               disable=not state.is_local_main_process)
    start = time.perf_counter()
    for index in mine:
        shard = blocks[index * per_shard:(index + 1) * per_shard]
        rows = shard["input_ids"]
        # packed blocks keep their document boundaries (position ids), as in training
        positions = shard.get("position_ids")
        parts: list[dict[str, torch.Tensor]] = []
        for b in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": r} if positions is None else
                             {"input_ids": r, "position_ids": positions[b + j]}
                             for j, r in enumerate(rows[b:b + batch_size])])
            mask = batch["attention_mask"].to(state.device)
            position_ids = batch.get("position_ids")
            hidden = final_hidden(teacher, batch["input_ids"].to(state.device), mask,
                                  None if position_ids is None else position_ids.to(state.device))
            parts.append(_signals(hidden[mask.bool()], head, meta))
            bar.update(int(mask.sum()))
        tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        tensors["input_ids"] = torch.tensor([t for r in rows for t in r], dtype=torch.int32)
        write_shard(folder, index, tensors)
    bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
    report = CaptureReport(folder, todo, seconds, size / max(meta.tokens, 1))
    if state.is_main_process:
        print(f"fastkd capture: {folder}: {meta.tokens} tokens in {meta.shards} shards, "
              f"{report.bytes_per_token:.1f} bytes per token; this session wrote {todo} tokens "
              f"in {seconds:.1f} s ({report.tokens_per_s:.0f} tokens/s on process 0)")
        if meta.kind == "topk":
            print(f"fastkd capture: serves temperatures {meta.temperatures}; train with "
                  f"--teacher-signals {folder}")
    return report


def _signals(hidden: torch.Tensor, head: Head, meta: CaptureMeta) -> dict[str, torch.Tensor]:
    """One batch's signals from its (n, H) final hidden states (real tokens only), on CPU.

    topk: the emitted logits z = f(hidden @ W^T + b) in fp32 (f the teacher's soft-cap and
    logit scale, `Head.emitted`), a chunk of tokens at a time (never all n x V at once); the k
    largest (ids, values) and logsumexp(z / T) over all V for each T served.
    """
    dtype = getattr(torch, meta.dtype)
    if meta.kind == "hidden":
        return {"hidden": hidden.to(dtype).cpu()}
    weight = head.weight.float()
    bias = None if head.bias is None else head.bias.float()
    chunk = max(1, _LOGIT_CHUNK_BYTES // (4 * weight.shape[0]))
    out: dict[str, list[torch.Tensor]] = {"ids": [], "logits": [], "lse": []}
    for start in range(0, hidden.shape[0], chunk):
        z = hidden[start:start + chunk].float() @ weight.T
        if bias is not None:
            z += bias
        z = head.emitted(z)
        values, ids = z.topk(meta.k, dim=-1)
        out["ids"].append(ids.to(torch.int32).cpu())
        out["logits"].append(values.to(dtype).cpu())
        out["lse"].append(torch.stack([torch.logsumexp(z / t, dim=-1)
                                       for t in meta.temperatures], dim=-1).cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}
