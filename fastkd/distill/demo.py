"""The embedded demo: distillation on a synthetic large-vocabulary language, on CPU in minutes.

It trains a small Llama teacher with cross-entropy, then the same smaller Qwen2 student twice for
the same steps from the same initialization: once with fastkd logit distillation from the
teacher (the settings of the `DistillConfig`), once with cross-entropy only; and prints the
held-out perplexity of all three against the language's true perplexity. With `on_policy`
(`--on-policy LAMBDA`) a fourth run trains the same student for the same steps with that
fraction of its batches sampled by itself from 16-token prompts of the corpus' blocks (the
on-policy settings), and the figures go to output_dir/demo_results.json as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .config import DistillConfig
from .data import CausalCollator
from .evaluate import perplexity
from .features import FeatureSettings
from .loss import LogitKD
from .metrics import JsonlLogger
from .on_policy import rollouts_from_config
from .on_policy_settings import OnPolicySettings
from .synthetic import bayes_perplexity, make_language, sample_corpus
from .trainer import DistillationTrainer
from .training import train_ce, training_arguments


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo: language, corpus, models and schedule."""

    vocab_size: int
    n_topics: int
    n_function: int
    function_rate: float
    zipf_exponent: float
    seq_len: int
    train_sequences: int
    eval_sequences: int
    teacher_width: int
    teacher_layers: int
    student_width: int
    student_layers: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    learning_rate: float


SCALES = {
    "default": DemoScale(
        vocab_size=16384, n_topics=64, n_function=256, function_rate=0.2, zipf_exponent=1.1,
        seq_len=64,
        train_sequences=6000, eval_sequences=200, teacher_width=128, teacher_layers=2,
        student_width=64, student_layers=1, teacher_steps=300, student_steps=100,
        batch_size=16, learning_rate=1e-2,
    ),
    "tiny": DemoScale(
        vocab_size=2048, n_topics=16, n_function=64, function_rate=0.2, zipf_exponent=1.1,
        seq_len=32,
        train_sequences=256, eval_sequences=32, teacher_width=32, teacher_layers=1,
        student_width=16, student_layers=1, teacher_steps=12, student_steps=6,
        batch_size=8, learning_rate=1e-2,
    ),
}


def teacher_model(scale: DemoScale, seed: int) -> PreTrainedModel:
    """A small Llama (untied embeddings, grouped-query attention)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=scale.vocab_size, hidden_size=scale.teacher_width,
        intermediate_size=2 * scale.teacher_width, num_hidden_layers=scale.teacher_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=scale.seq_len,
        tie_word_embeddings=False,
    ))


def student_model(scale: DemoScale, seed: int) -> PreTrainedModel:
    """A smaller Qwen2 (tied embeddings); the same seed gives the same initialization."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=scale.vocab_size, hidden_size=scale.student_width,
        intermediate_size=2 * scale.student_width, num_hidden_layers=scale.student_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=scale.seq_len,
        tie_word_embeddings=True,
    ))


@dataclass
class DemoSetup:
    """The demo's language, data and run settings (shared by the demo and the ablation)."""

    scale: DemoScale
    train: Dataset
    held_out: list[dict[str, list[int]]]
    floor: float  # the language's own held-out perplexity
    collator: CausalCollator
    teacher_cfg: DistillConfig
    student_cfg: DistillConfig


def demo_setup(cfg: DistillConfig) -> DemoSetup:
    """Sample the language and corpora of `cfg.demo_scale` and fix the demo's schedules."""
    scale = SCALES[cfg.demo_scale]
    lang = make_language(scale.vocab_size, scale.n_topics, scale.n_function,
                         scale.function_rate, scale.zipf_exponent, seed=cfg.seed)
    train = Dataset.from_dict({"input_ids": sample_corpus(
        lang, scale.train_sequences, scale.seq_len, seed=cfg.seed + 1).tolist()})
    eval_corpus = sample_corpus(lang, scale.eval_sequences, scale.seq_len, seed=cfg.seed + 2)
    run_cfg = dataclasses.replace(cfg, batch_size=scale.batch_size, grad_accum=1,
                                  learning_rate=scale.learning_rate, save_steps=10**9,
                                  training_args={"save_strategy": "no", **cfg.training_args})
    return DemoSetup(
        scale=scale, train=train, held_out=[{"input_ids": row} for row in eval_corpus.tolist()],
        floor=bayes_perplexity(lang, eval_corpus), collator=CausalCollator(pad_token_id=0),
        teacher_cfg=dataclasses.replace(run_cfg, steps=scale.teacher_steps),
        student_cfg=dataclasses.replace(run_cfg, steps=scale.student_steps),
    )


def train_teacher(setup: DemoSetup, cfg: DistillConfig, output_dir: Path) -> PreTrainedModel:
    """The demo's teacher, trained with cross-entropy."""
    return train_ce(teacher_model(setup.scale, cfg.seed), setup.train, setup.teacher_cfg,
                    output_dir, 0)


def run_demo(cfg: DistillConfig) -> dict[str, float]:
    """Run the demo at `cfg.demo_scale`, print the table and return its numbers."""
    setup = demo_setup(cfg)
    scale, train, collator = setup.scale, setup.train, setup.collator
    on_policy = OnPolicySettings.from_value(cfg.on_policy)
    if on_policy is not None:
        on_policy.check_lengths(scale.seq_len, f"the {cfg.demo_scale} demo's seq_len")
    out = Path(cfg.output_dir)
    rows: dict[str, tuple[float, float]] = {}

    phases = {
        "teacher": f"teacher: a {scale.teacher_layers}-layer Llama (width "
                   f"{scale.teacher_width}), cross-entropy, {scale.teacher_steps} steps",
        "KD student": f"KD student: a {scale.student_layers}-layer Qwen2 (width "
                      f"{scale.student_width}), fastkd distillation from the teacher, "
                      f"{scale.student_steps} steps",
        "CE student": f"CE-only student: the same Qwen2 from the same initialization, "
                      f"cross-entropy only, {scale.student_steps} steps",
    }
    if on_policy is not None:
        phases["on-policy"] = (
            f"on-policy student: the same Qwen2 from the same initialization, "
            f"{on_policy.lmbda:.0%} of its batches sampled by itself ({on_policy.prompt_tokens}-"
            f"token prompts, {on_policy.max_new_tokens} new tokens at temperature "
            f"{on_policy.temperature:g}, {on_policy.divergence}), {scale.student_steps} steps")

    def timed(name: str, train_fn) -> PreTrainedModel:
        print(f"\n[{len(rows) + 1}/{len(phases)}] {phases[name]}", flush=True)
        start = time.perf_counter()
        model = train_fn()
        rows[name] = (perplexity(model, setup.held_out, collator), time.perf_counter() - start)
        return model

    teacher = timed("teacher", lambda: train_teacher(setup, cfg, out / "teacher"))

    def distill(name: str, metrics: str, with_rollouts: bool) -> PreTrainedModel:
        student = student_model(scale, cfg.seed + 3)
        kd = LogitKD.from_config(cfg)
        # the synthetic language has no EOS: completions run to max_new_tokens
        rollouts = rollouts_from_config(cfg.on_policy, kd, cfg.seed, pad_token_id=0,
                                        eos_token_id=None) if with_rollouts else None
        DistillationTrainer(
            model=student, args=training_arguments(setup.student_cfg, out / name),
            train_dataset=train, data_collator=collator, teachers=[teacher], kd=kd,
            features=FeatureSettings.from_config(cfg), on_policy=rollouts,
            callbacks=[JsonlLogger(out / metrics)],
        ).train()
        return student

    timed("KD student", lambda: distill("student_kd", "metrics.jsonl", False))
    timed("CE student", lambda: train_ce(student_model(scale, cfg.seed + 3), train,
                                         setup.student_cfg, out / "student_ce", 0))
    if on_policy is not None:
        timed("on-policy", lambda: distill("student_on_policy", "metrics_on_policy.jsonl",
                                           True))
    _print_table(scale, setup.floor, rows)
    print(f"per-step metrics of the KD student: {out / 'metrics.jsonl'}; the models are not "
          "saved (a run on your own models saves its student to output_dir/final)")
    result = {f"{name} perplexity": ppl for name, (ppl, _) in rows.items()}
    if on_policy is not None:
        record = {"demo_scale": cfg.demo_scale, "seed": cfg.seed, "divergence": cfg.divergence,
                  "on_policy": dataclasses.asdict(on_policy), "bayes_floor": setup.floor,
                  "steps": {"teacher": scale.teacher_steps, "students": scale.student_steps},
                  "held_out_perplexity": {n: ppl for n, (ppl, _) in rows.items()},
                  "wall_s": {n: wall for n, (_, wall) in rows.items()},
                  "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                  "torch": torch.__version__}
        (out / "demo_results.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"on-policy student's metrics: {out / 'metrics_on_policy.jsonl'}; the figures: "
              f"{out / 'demo_results.json'}")
    return result


def _print_table(scale: DemoScale, floor: float, rows: dict[str, tuple[float, float]]) -> None:
    steps = {"teacher": scale.teacher_steps}
    print(f"\nfastkd distill demo: synthetic topic language, vocabulary {scale.vocab_size}, "
          f"{scale.n_topics} topics; the best possible held-out perplexity is {floor:.2f}")
    print(f"{'model':<12} {'steps':>6} {'held-out ppl':>13} {'wall s':>8}")
    for name, (ppl, wall) in rows.items():
        print(f"{name:<12} {steps.get(name, scale.student_steps):>6} {ppl:>13.2f} {wall:>8.1f}")
    teacher, kd, ce = (rows[name][0] for name in ("teacher", "KD student", "CE student"))
    extra = f", on-policy student {rows['on-policy'][0] / teacher - 1:+.0%}" \
        if "on-policy" in rows else ""
    print(f"perplexity above the teacher's: KD student {kd / teacher - 1:+.0%}, "
          f"CE-only student {ce / teacher - 1:+.0%}{extra}")
