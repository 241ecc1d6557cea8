"""Training behaviour of DistillationTrainer: loss goes down, gradient accumulation is
normalised by the step's tokens, checkpoint + resume continues identically, metrics logged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

from fastkd.distill import DistillationTrainer, LogitKD
from fastkd.distill.data import CausalCollator
from fastkd.distill.metrics import JsonlLogger
from fastkd.distill.teachers import LiveTeachers
from tests.distill_helpers import args, llama, qwen2, reference_loss, rows


class StopAt(TrainerCallback):
    """Interrupts training after `step` (a crash after a checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def run(tmp_path, student, teachers, data, kd=None, resume=None, stop_at=None, **kw):
    trainer = DistillationTrainer(
        model=student, args=args(tmp_path, **kw), teachers=teachers, kd=kd or LogitKD(),
        train_dataset=data, data_collator=CausalCollator(0),
        callbacks=[JsonlLogger(tmp_path / "metrics.jsonl")] + ([StopAt(stop_at)] if stop_at else []),
    )
    return trainer, trainer.train(resume_from_checkpoint=resume)


def logged(tmp_path) -> list[dict]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def test_a_few_steps_reduce_the_loss(tmp_path):
    data = rows(4)
    run(tmp_path, qwen2(), [llama()], data, max_steps=8, optim="adamw_torch", learning_rate=1e-2)
    losses = [r["loss"] for r in logged(tmp_path)]
    assert len(losses) == 8
    assert losses[-1] < 0.7 * losses[0]
    last = logged(tmp_path)[-1]
    assert last["tokens_per_s"] > 0 and last["cpu_rss_peak_gib"] > 0
    assert last["kd_divergence"] > 0 and last["kd_hard_ce"] > 0


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """4 micro-batches of 1 row (different lengths, so per-micro-batch means would differ)
    give the same SGD update and loss as one batch of 4."""
    data, teacher = rows(4, seed=3), llama()
    big, _ = run(tmp_path / "big", qwen2(), [teacher], data, per_device_train_batch_size=4)
    acc, _ = run(tmp_path / "acc", qwen2(), [teacher], data, per_device_train_batch_size=1,
                 gradient_accumulation_steps=4)
    assert abs(logged(tmp_path / "big")[0]["loss"] - logged(tmp_path / "acc")[0]["loss"]) < 1e-5
    init = dict(qwen2().named_parameters())
    for (name, a), b in zip(big.model.named_parameters(), acc.model.parameters(), strict=True):
        step = (a - init[name]).norm()
        assert step > 0, name
        assert (a - b).norm() <= 1e-5 * step + 1e-7, name


def test_resume_continues_with_identical_state(tmp_path):
    data, teacher = rows(16, seed=5), llama()
    opts = dict(max_steps=6, per_device_train_batch_size=2, optim="adamw_torch",
                learning_rate=1e-2, lr_scheduler_type="linear", save_strategy="steps",
                save_steps=3)
    full, _ = run(tmp_path / "full", qwen2(), [teacher], data, **opts)
    part_dir = tmp_path / "part"
    run(part_dir, qwen2(), [teacher], data, stop_at=3, **opts)
    # a fresh student with other weights: everything must come from the checkpoint
    resumed, _ = run(part_dir, qwen2(seed=99), [teacher], data, **opts,
                     resume=str(part_dir / "checkpoint-3"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in logged(tmp_path / "full")][3:] == \
        [r["loss"] for r in logged(part_dir)][3:]


def test_resume_of_a_tied_student_warns_of_no_missing_keys(tmp_path, monkeypatch):
    """A tied lm_head is not saved in a checkpoint; it comes back through the embedding."""
    import transformers.trainer

    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning",
                        lambda msg, *a, **k: warnings.append(str(msg)))
    data, teacher = rows(8, seed=5), llama()
    opts = dict(max_steps=2, per_device_train_batch_size=2, save_strategy="steps", save_steps=1)
    run(tmp_path, qwen2(), [teacher], data, stop_at=1, **opts)
    resumed, _ = run(tmp_path, qwen2(seed=99), [teacher], data, **opts,
                     resume=str(tmp_path / "checkpoint-1"))
    assert not [w for w in warnings if "missing keys" in w], warnings
    model = resumed.model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_multi_teacher_run_logs_mixing_weights(tmp_path):
    teachers = [llama(seed=10), qwen2(width=20, tied=False, seed=11, layers=2)]
    run(tmp_path, llama(width=16, tied=True, seed=12, layers=1), teachers, rows(4),
        kd=LogitKD(hard_weight=0.5, temperature=2.0), max_steps=3)
    records = logged(tmp_path)
    assert len(records) == 3
    for r in records:
        assert 0 < r["mixing_w0"] < 1 and abs(r["mixing_w0"] + r["mixing_w1"] - 1) < 1e-5


@pytest.mark.parametrize("teachers,kd", [
    (1, dict(divergence="jsd", beta=0.3, temperature=2.0, soft_weight=0.7, hard_weight=0.4)),
    (2, dict(temperature=2.0, soft_weight=0.6, hard_weight=0.0)),
])
def test_logged_parts_come_from_the_one_loss_call_that_trains(tmp_path, monkeypatch, teachers,
                                                              kd):
    """kd_divergence and kd_hard_ce equal the float64 divergence and CE (hard_weight = 0
    included), and a logging step calls the loss once, with return_parts (the other steps
    without)."""
    calls = []
    loss = LiveTeachers.loss

    def counted_loss(self, *arguments, **options):
        calls.append(options.get("return_parts", False))
        return loss(self, *arguments, **options)

    monkeypatch.setattr(LiveTeachers, "loss", counted_loss)
    data, student = rows(4), qwen2(tied=False)  # one batch of all rows: order-free means
    models = [llama(seed=10), llama(width=32, seed=7)][:teachers]
    with torch.no_grad():  # logits with a spread of several units: parts of order 1
        for model, scale in [(student, 10.0), *((m, 30.0) for m in models)]:
            model.get_output_embeddings().weight.mul_(scale)
    initial = copy.deepcopy(student)
    run(tmp_path, student, models, data, kd=LogitKD(**kd), max_steps=2, logging_steps=2,
        learning_rate=0.0)  # lr 0: the logged step 2 still sees the initial student
    assert calls == [False, True]
    (record,) = logged(tmp_path)
    batch = CausalCollator(0)(data)
    settings = {k: v for k, v in kd.items() if k not in ("soft_weight", "hard_weight")}
    with torch.no_grad():
        divergence = reference_loss(initial, models, batch, soft_weight=1.0, hard_weight=0.0,
                                    **settings)
        cross_entropy = reference_loss(initial, models, batch, soft_weight=0.0,
                                       hard_weight=1.0, **settings)
    # fp32 hidden states and lm_heads against float64 logits of the same models
    assert record["kd_divergence"] == pytest.approx(float(divergence), rel=1e-4)
    assert record["kd_hard_ce"] == pytest.approx(float(cross_entropy), rel=1e-4)
    assert record["loss"] == pytest.approx(
        kd["soft_weight"] * record["kd_divergence"] + kd["hard_weight"] * record["kd_hard_ce"],
        rel=1e-5)


def test_bf16_mixed_precision_steps(tmp_path):
    """bf16 autocast on the student (hidden states bf16, lm_head weight fp32) and a bf16
    teacher: the loss stays finite and close to the fp32 loss of the same first step."""
    data, teacher = rows(4), llama()
    run(tmp_path / "fp32", qwen2(), [teacher], data, max_steps=1)
    run(tmp_path / "bf16", qwen2(), [llama().bfloat16()], data, max_steps=2, bf16=True,
        use_cpu=True)
    fp32, bf16 = logged(tmp_path / "fp32"), logged(tmp_path / "bf16")
    assert len(bf16) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) < 0.05 * fp32[0]["loss"]


def test_compiled_student_takes_the_same_steps(tmp_path):
    # torch.compile traces the student's forward, hooks included: the loss hook runs outside
    # the graph (it calls fastkd's own kernels) and the steps equal the eager ones.
    data, teacher = rows(4, seed=5), llama()
    run(tmp_path / "eager", qwen2(), [teacher], data, max_steps=2)
    run(tmp_path / "compiled", qwen2(), [teacher], data, max_steps=2, torch_compile=True,
        torch_compile_backend="eager")
    eager, compiled = logged(tmp_path / "eager"), logged(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
