"""`fastkd distill --ablation`: what each distillation term adds, on the embedded demo.

The demo's teacher is trained once; then the same student (same initialization, data order and
steps) is trained once per row: cross-entropy only, logit KD, then hidden-state, attention and
feed-forward alignment added one at a time, and finally every term including the hard CE. Each
row reports held-out perplexity and wall time (training and evaluation).

Feature weights and options come from the config; a weight left at 0 uses the default below,
and attention alignment bridges the demo's different head counts with relation heads
(`relation_heads`, default 4).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from transformers import PreTrainedModel

from .config import DistillConfig
from .demo import DemoSetup, demo_setup, student_model, train_teacher
from .evaluate import perplexity
from .features import FeatureSettings
from .loss import LogitKD
from .metrics import JsonlLogger
from .trainer import DistillationTrainer
from .training import train_ce, training_arguments

DEFAULT_WEIGHTS = {"hidden_weight": 1.0, "attention_weight": 1.0, "ffn_weight": 1.0,
                   "hard_weight": 1.0}
DEFAULT_RELATION_HEADS = 4

# row name -> the weights switched on beyond the logit KD (None: cross-entropy only)
ROWS: dict[str, tuple[str, ...] | None] = {
    "CE only": None,
    "logits KD": (),
    "+ hidden": ("hidden_weight",),
    "+ attention": ("hidden_weight", "attention_weight"),
    "+ FFN": ("hidden_weight", "attention_weight", "ffn_weight"),
    "all terms": ("hidden_weight", "attention_weight", "ffn_weight", "hard_weight"),
}


def row_config(cfg: DistillConfig, terms: tuple[str, ...]) -> DistillConfig:
    """`cfg` with exactly `terms` switched on besides the logit KD (defaults for zero weights)."""
    weights = {name: (getattr(cfg, name) or default) if name in terms else 0.0
               for name, default in DEFAULT_WEIGHTS.items()}
    return dataclasses.replace(cfg, **weights,
                               relation_heads=cfg.relation_heads or DEFAULT_RELATION_HEADS)


def run_ablation(cfg: DistillConfig) -> dict[str, tuple[float, float]]:
    """Train every row at `cfg.demo_scale`, print the table; returns row -> (ppl, wall s)."""
    setup = demo_setup(cfg)
    out = Path(cfg.output_dir) / "ablation"
    total = len(ROWS) + 1
    print(f"\n[1/{total}] teacher: cross-entropy, {setup.scale.teacher_steps} steps", flush=True)
    teacher = train_teacher(setup, cfg, out / "teacher")
    teacher_ppl = perplexity(teacher, setup.held_out, setup.collator)
    results: dict[str, tuple[float, float]] = {}
    for row, (name, terms) in enumerate(ROWS.items(), start=2):
        print(f"\n[{row}/{total}] student, {name}: {setup.scale.student_steps} steps",
              flush=True)
        start = time.perf_counter()
        run_dir = out / name.replace(" ", "_").replace("+", "plus")
        if terms is None:
            student = train_ce(student_model(setup.scale, cfg.seed + 3), setup.train,
                               setup.student_cfg, run_dir, 0)
        else:
            student = _distill(setup, row_config(cfg, terms), teacher, run_dir)
        results[name] = (perplexity(student, setup.held_out, setup.collator),
                         time.perf_counter() - start)
    print(ablation_table(setup, teacher_ppl, results))
    print(f"per-step metrics of each distilled row: {out}/<row>/metrics.jsonl")
    return results


def _distill(setup: DemoSetup, cfg: DistillConfig, teacher: PreTrainedModel,
             run_dir: Path) -> PreTrainedModel:
    """The demo's student distilled from `teacher` with the terms of `cfg`."""
    student = student_model(setup.scale, cfg.seed + 3)
    DistillationTrainer(
        model=student, args=training_arguments(setup.student_cfg, run_dir),
        train_dataset=setup.train, data_collator=setup.collator, teachers=[teacher],
        kd=LogitKD.from_config(cfg), features=FeatureSettings.from_config(cfg),
        callbacks=[JsonlLogger(run_dir / "metrics.jsonl")],
    ).train()
    return student


def ablation_table(setup: DemoSetup, teacher_ppl: float,
                   results: dict[str, tuple[float, float]]) -> str:
    """The results as a markdown table, with the teacher and the language's floor."""
    scale = setup.scale
    lines = [
        f"\nfastkd distill ablation: synthetic topic language, vocabulary {scale.vocab_size}; "
        f"teacher {scale.teacher_layers} layers x {scale.teacher_width} "
        f"(held-out ppl {teacher_ppl:.2f}), student {scale.student_layers} layers x "
        f"{scale.student_width}, {scale.student_steps} steps per row; best possible ppl "
        f"{setup.floor:.2f}",
        "",
        "| run | held-out ppl | wall s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ppl:.2f} | {wall:.1f} |" for name, (ppl, wall) in results.items()]
    return "\n".join(lines)
