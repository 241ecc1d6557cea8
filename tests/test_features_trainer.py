"""Feature alignment inside DistillationTrainer: the loss adds the feature terms, every term is
logged, projections train with the student and are checkpointed and restored, bad settings
fail before training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from fastkd.distill import DistillationTrainer, LogitKD
from fastkd.distill.data import CausalCollator
from fastkd.distill.features import FeatureSettings
from fastkd.distill.features.projections import FILE_NAME
from fastkd.distill.metrics import JsonlLogger
from tests.distill_helpers import args, llama, qwen2, reference_loss, rows

ALL_TERMS = FeatureSettings(hidden_weight=0.5, attention_weight=0.3, attention_loss="kl",
                            relation_heads=4, ffn_weight=0.2)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def trainer_for(tmp_path, student, teachers, features=ALL_TERMS, data=None, stop_at=None,
                kd=None, **kw):
    return DistillationTrainer(
        model=student, args=args(tmp_path, **kw), teachers=teachers, kd=kd or LogitKD(),
        features=features, train_dataset=data or rows(4), data_collator=CausalCollator(0),
        callbacks=[JsonlLogger(tmp_path / "metrics.jsonl")] + ([StopAt(stop_at)] if stop_at
                                                               else []),
    )


def logged(tmp_path) -> list[dict]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


@pytest.mark.parametrize("kd", [LogitKD(), LogitKD(hard_weight=0.5, temperature=2.0)])
def test_loss_is_logit_loss_plus_feature_terms(tmp_path, kd):
    teacher, student = llama(), qwen2(layers=2)
    trainer = trainer_for(tmp_path, student, [teacher], kd=kd)
    batch = CausalCollator(0)(rows(3, seed=7))
    student.eval()
    loss = trainer.compute_loss(student, batch)

    fa = trainer.features
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with fa.record_student(student) as fs:
        student(**inputs)
    with torch.no_grad(), fa.record_teacher(0, teacher) as ft:
        teacher(**inputs)
    counted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100
    features, parts = fa(fs, [ft], batch["attention_mask"], counted)
    assert set(parts) == {"hidden", "attention", "ffn"} and all(v > 0 for v in parts.values())
    logits = reference_loss(student, [teacher], batch, temperature=kd.temperature,
                            hard_weight=kd.hard_weight)
    torch.testing.assert_close(loss.double(), logits + features.double() / counted.sum(),
                               rtol=1e-5, atol=1e-7)


def test_every_term_logged_and_projections_trained(tmp_path):
    trainer = trainer_for(tmp_path, qwen2(layers=2), [llama()], max_steps=3, optim="adamw_torch",
                          learning_rate=1e-2)
    before = {k: v.clone() for k, v in trainer.features.state_dict().items()}
    trainer.train()
    records = logged(tmp_path)
    assert len(records) == 3
    for r in records:
        assert {"kd_divergence", "kd_hard_ce", "feature_hidden", "feature_attention",
                "feature_ffn"} <= r.keys()
        parts = r["kd_divergence"] + 0.5 * r["feature_hidden"] + 0.3 * r["feature_attention"] \
            + 0.2 * r["feature_ffn"]
        assert abs(r["loss"] - parts) < 1e-4 * r["loss"]
    groups = [g for g in trainer.optimizer.param_groups if g.get("name") == "feature_projections"]
    assert len(groups) == 1 and len(groups[0]["params"]) == 4
    for name, value in trainer.features.state_dict().items():
        assert not torch.equal(value, before[name]), name


def test_checkpoint_and_resume_restore_projections(tmp_path):
    data, teacher = rows(16, seed=5), llama()
    opts = dict(max_steps=4, per_device_train_batch_size=2, optim="adamw_torch",
                learning_rate=1e-2, lr_scheduler_type="linear", save_strategy="steps",
                save_steps=2)
    full = trainer_for(tmp_path / "full", qwen2(), [teacher], data=data, **opts)
    full.train()
    part_dir = tmp_path / "part"
    trainer_for(part_dir, qwen2(), [teacher], data=data, stop_at=2, **opts).train()
    assert (part_dir / "checkpoint-2" / FILE_NAME).is_file()
    torch.manual_seed(99)  # other initial projections: they must come from the checkpoint
    resumed = trainer_for(part_dir, qwen2(seed=99), [teacher], data=data, **opts)
    resumed.train(resume_from_checkpoint=str(part_dir / "checkpoint-2"))
    for (name, a), b in zip(full.features.state_dict().items(),
                            resumed.features.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name
    resumed.save_model(str(tmp_path / "final"))  # the exported student has no projections
    assert (tmp_path / "final" / "config.json").is_file()
    assert not (tmp_path / "final" / FILE_NAME).exists()


def test_multi_teacher_feature_terms(tmp_path):
    teachers = [llama(seed=10), llama(width=32, seed=11, layers=3)]
    trainer = trainer_for(tmp_path, qwen2(layers=2), teachers,
                          features=FeatureSettings(hidden_weight=1.0, weighting="static",
                                                   teacher_priors=(1.0, 3.0)),
                          max_steps=2)
    assert trainer.features.pairs == [((0, 0), (1, 1)), ((0, 1), (1, 2))]
    trainer.train()
    assert all(r["feature_hidden"] > 0 and "mixing_w1" in r for r in logged(tmp_path))


@pytest.mark.parametrize(("features", "match"), [
    (FeatureSettings(attention_weight=1.0), "query-head counts differ; set relation_heads"),
    (FeatureSettings(attention_weight=1.0, relation_heads=3), "relation_heads=3 must divide"),
    (FeatureSettings(hidden_weight=1.0, layer_map="0:2"), r"layer pair \(0, 2\) is out of range"),
])
def test_bad_feature_settings_fail_at_construction(tmp_path, features, match):
    with pytest.raises(ValueError, match=match):
        trainer_for(tmp_path, qwen2(), [llama()], features=features)


def test_inactive_features_add_nothing(tmp_path):
    trainer = trainer_for(tmp_path, qwen2(), [llama()], features=FeatureSettings())
    assert trainer.features is None


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Feature terms are sums over counted tokens, so 4 micro-batches of 1 row give the same
    update of the student and the projections as one batch of 4."""
    data, teacher = rows(4, seed=3), llama()
    big = trainer_for(tmp_path / "big", qwen2(layers=2), [teacher], data=data,
                      per_device_train_batch_size=4)
    big.train()
    acc = trainer_for(tmp_path / "acc", qwen2(layers=2), [teacher], data=data,
                      per_device_train_batch_size=1, gradient_accumulation_steps=4)
    acc.train()
    assert abs(logged(tmp_path / "big")[0]["loss"] - logged(tmp_path / "acc")[0]["loss"]) < 1e-6
    for (name, a), b in zip([*big.model.named_parameters(), *big.features.named_parameters()],
                            [*acc.model.parameters(), *acc.features.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_mixed_precision_with_feature_terms(tmp_path):
    """bf16 autocast on the student and a bf16 teacher: captured features are bf16, the terms
    run in fp32, and every logged term stays close to the fp32 run's first step."""
    data = rows(4)
    trainer_for(tmp_path / "fp32", qwen2(layers=2), [llama()], data=data, max_steps=1).train()
    trainer_for(tmp_path / "bf16", qwen2(layers=2), [llama().bfloat16()], data=data,
                max_steps=2, bf16=True, use_cpu=True).train()
    fp32, bf16 = logged(tmp_path / "fp32"), logged(tmp_path / "bf16")
    assert len(bf16) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)
    for key in ("loss", "feature_hidden", "feature_attention", "feature_ffn"):
        assert abs(bf16[0][key] - fp32[0][key]) < 0.05 * fp32[0][key], key
