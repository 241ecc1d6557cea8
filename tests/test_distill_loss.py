"""The trainer's loss equals a float64 reference on the models' materialized logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from fastkd.distill import DistillationTrainer, LogitKD
from fastkd.distill.capture import final_hidden, loss_in_forward
from fastkd.distill.data import CausalCollator
from tests.distill_helpers import (
    args,
    check_trainer_against_reference,
    llama,
    qwen2,
    reference_loss,
    rows,
)

BATCH = CausalCollator(0)(rows(3, seed=7))


def trainer_for(tmp_path, student, teachers, kd=None, vocab_size=None):
    return DistillationTrainer(model=student, args=args(tmp_path), teachers=teachers,
                               kd=kd or LogitKD(), vocab_size=vocab_size,
                               data_collator=CausalCollator(0), train_dataset=rows(4))


CASES = [
    # (teacher, student, LogitKD settings)
    (lambda: llama(tied=False), lambda: qwen2(tied=True), dict()),
    (lambda: qwen2(width=24, tied=False, layers=2), lambda: llama(width=16, tied=True, layers=1),
     dict(divergence="reverse_kl", temperature=2.0, hard_weight=0.3)),
    (lambda: llama(), lambda: llama(width=16, tied=False, seed=3),
     dict(divergence="jsd", beta=0.3, temperature=0.7, soft_weight=0.5, hard_weight=1.0)),
    (lambda: llama(), lambda: qwen2(), dict(soft_weight=0.0, hard_weight=1.0)),
]


@pytest.mark.parametrize("make_teacher, make_student, settings", CASES)
def test_loss_and_gradients_match_reference(tmp_path, make_teacher, make_student, settings):
    teacher, student = make_teacher(), make_student()
    trainer = trainer_for(tmp_path, student, [teacher], LogitKD(**settings))
    check_trainer_against_reference(trainer, student, [teacher], settings, BATCH)


def test_teacher_padding_rows_are_dropped(tmp_path, caplog):
    teacher, student = llama(vocab=97 + 31), qwen2()
    trainer = trainer_for(tmp_path, student, [teacher], vocab_size=97)
    assert "using the first 97" in caplog.text
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(BATCH))
        ref = reference_loss(student, [teacher], BATCH)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


@pytest.mark.parametrize("settings", [dict(), dict(weighting="static", fusion="weighted_kl",
                                                   temperature=1.5, hard_weight=0.2)])
def test_multi_teacher_matches_reference(tmp_path, settings):
    teachers = [llama(seed=10), qwen2(width=20, tied=False, seed=11, layers=2)]
    student = qwen2(seed=12)
    trainer = trainer_for(tmp_path, student, teachers, LogitKD(**settings))
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(BATCH))
        ref = reference_loss(student, teachers, BATCH, **settings)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_refuses_soft_capped_or_scaled_logits(tmp_path):
    teacher = llama()
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        trainer_for(tmp_path, qwen2(), [teacher])
    student = qwen2()
    student.config.logits_scaling = 4.0
    with pytest.raises(ValueError, match="logits_scaling"):
        trainer_for(tmp_path, student, [llama()])


class ScaledLogitsLlama(LlamaForCausalLM):
    """A causal LM whose forward changes its lm_head's output (as logit multipliers do)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.25
        return out


def test_refuses_a_forward_that_changes_the_lm_head_output(tmp_path):
    student = ScaledLogitsLlama(llama(width=16).config)
    trainer = trainer_for(tmp_path, student, [llama()])
    with pytest.raises(ValueError, match="ScaledLogitsLlama: its logits are not its lm_head's "
                                         r"output \(the lm_head ran 1 times"):
        trainer.compute_loss(student, dict(BATCH))
    student.config.lm_head_multiplier = 0.25  # Falcon-H1's name for it: refused up front
    with pytest.raises(ValueError, match="lm_head_multiplier"):
        trainer_for(tmp_path, student, [llama()])


def test_refuses_unmatched_vocabularies(tmp_path):
    with pytest.raises(ValueError, match="fewer than the student's"):
        trainer_for(tmp_path, qwen2(vocab=120), [llama(vocab=97)])
    with pytest.raises(ValueError, match="tokenizer has 140 tokens"):
        trainer_for(tmp_path, qwen2(vocab=120), [llama(vocab=160)], vocab_size=140)


def test_all_ignored_batch_gives_zero_loss(tmp_path):
    student = qwen2()
    trainer = trainer_for(tmp_path, student, [llama()])
    batch = dict(BATCH, labels=torch.full_like(BATCH["labels"], -100))
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in student.parameters())


def test_final_hidden_is_what_the_lm_head_reads():
    model = llama()
    got = final_hidden(model, BATCH["input_ids"], BATCH["attention_mask"])
    logits = model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits
    assert torch.allclose(got @ model.lm_head.weight.T, logits, atol=1e-5)
    with pytest.raises(ValueError, match="LlamaModel: get_decoder"):
        final_hidden(model.model, BATCH["input_ids"], BATCH["attention_mask"])


def test_loss_in_forward_is_the_forward_output_and_skips_autocast():
    model = qwen2()  # tied: the lm_head weight is the embedding
    ids, mask = BATCH["input_ids"], BATCH["attention_mask"]
    seen = {}

    def loss_fn(hidden, head):
        seen["dtype"] = torch.mm(hidden[0], head.weight.T).dtype  # autocast would give bf16
        return (hidden.float() @ head.weight.T).logsumexp(-1).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_in_forward(model, ids, mask, 90, loss_fn)
    assert seen["dtype"] == torch.float32
    hidden = final_hidden(model, ids, mask)
    want = (hidden @ model.lm_head.weight[:90].T).logsumexp(-1).sum()
    torch.testing.assert_close(got, want)
    got.backward()
    assert model.lm_head.weight.grad[:90].abs().min() > 0  # every used head row


def test_logit_kd_refuses_a_loss_that_is_always_zero():
    with pytest.raises(ValueError, match="soft_weight and hard_weight are both 0"):
        LogitKD(soft_weight=0.0, hard_weight=0.0)
    with pytest.raises(ValueError, match="hard_weight must be a finite number >= 0"):
        LogitKD(hard_weight=-1.0)
