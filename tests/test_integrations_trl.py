"""fastkd.integrations.trl: FusedGKDTrainer's loss and student gradients equal TRL's own
GKDTrainer loss on the same batch, and a few TRL training steps (with on-policy generation) run
with fastkd inside."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from tests import distill_helpers as h

trl_gkd = pytest.importorskip("trl.experimental.gkd", reason="the trl extra is not installed")
from fastkd.integrations.trl import FusedGKDTrainer, fused_generalized_jsd_loss  # noqa: E402

# The chat template of the tiny word-level tokenizer: each message's words, in order.
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tokenizer():
    tok = h.tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def conversations(n: int, seed: int = 0) -> Dataset:
    """n prompt / reply pairs of random words, of different lengths (so batches pad)."""
    g = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(f"w{int(w)}" for w in torch.randint(3, h.VOCAB, (k,), generator=g))

    return Dataset.from_list([
        {"messages": [{"role": "user", "content": words(3 + i % 4)},
                      {"role": "assistant", "content": words(2 + (2 * i) % 5)}]}
        for i in range(n)
    ])


def spread_logits(model, scale: float):
    """Multiply the final norm's weight: the tiny models' logits get std ~ several units
    (init std 0.02 gives near-uniform distributions, which hide errors)."""
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return model


def models():
    teacher = spread_logits(h.llama(), 60.0)      # untied lm_head, width 24
    student = spread_logits(h.qwen2(), 80.0)      # tied lm_head, width 16
    return student, teacher


def gkd_config(out, **kw):
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4,
                learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no",
                dataloader_pin_memory=False, seed=0, data_seed=0, disable_tqdm=True,
                max_length=64, lmbda=0.0, max_new_tokens=3, bf16=False,
                gradient_checkpointing=False)
    return trl_gkd.GKDConfig(**{**base, **kw})


def trainer(cls, student, teacher, out, **kw):
    return cls(model=student, teacher_model=teacher, args=gkd_config(out, **kw),
               processing_class=tokenizer(), train_dataset=conversations(8))


def loss_and_grads(trainer_, batch, num_items):
    model = trainer_.model
    model.zero_grad()
    loss = trainer_.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def rel(a, b):
    return float((a.detach().double() - b.double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_gkd_loss_and_student_gradients_equal_trls(beta, tmp_path):
    student, teacher = models()
    ours = trainer(FusedGKDTrainer, copy.deepcopy(student), copy.deepcopy(teacher),
                   tmp_path / "ours", beta=beta)
    trls = trainer(trl_gkd.GKDTrainer, copy.deepcopy(student), copy.deepcopy(teacher),
                   tmp_path / "trl", beta=beta)
    oracle = trainer(trl_gkd.GKDTrainer, copy.deepcopy(student).double(),
                     copy.deepcopy(teacher).double(), tmp_path / "f64", beta=beta)
    batch = ours.data_collator([conversations(8)[i] for i in range(4)])
    shifted = batch["labels"][:, 1:]
    assert 0 < int((shifted != -100).sum()) < shifted.numel()  # prompts and padding masked
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"]).logits
    assert logits.std() > 3  # a realistic spread, not near-uniform
    for num_items in (None, 37):  # TRL's batchmean, and the Trainer's global token count
        loss, grads = loss_and_grads(ours, batch, num_items)
        trl_loss, trl_grads = loss_and_grads(trls, batch, num_items)
        ref_loss, ref_grads = loss_and_grads(oracle, batch, num_items)
        assert torch.isfinite(loss) and loss > 0
        # The oracle is TRL's own loss, run in float64. fastkd's fp32 differs from it by
        # rounding only: fp32 dot products in the decoder, the head GEMMs and the gradient
        # reductions (relative error ~ K 2^-24 with K <= 97 terms, ~6e-6 per reduction, a few
        # chained) and the log-sum-exps over V = 97 (~ 2^-24 log V relative): 1e-5 on the loss,
        # 3e-5 on each gradient.
        assert rel(loss, ref_loss) < 1e-5 and rel(trl_loss, ref_loss) < 1e-5
        for name, ref in ref_grads.items():
            assert rel(grads[name], ref) < 3e-5, (name, rel(grads[name], ref))
            # TRL's fp32 autograd through kl_div of log-probabilities cancels terms as large as
            # |log p| (~80 here) to gradients of order 1: up to ~80 x 2^-24 x sqrt(V) ~ 5e-5,
            # and 1e-3 bounds it; this checks that the float64 run is TRL's computation.
            assert rel(trl_grads[name], ref) < 1e-3, name


def test_fused_generalized_jsd_loss_counts_like_trl_and_is_zero_without_tokens():
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(29, 8, generator=g, dtype=torch.float64) * 2
    ht = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    wt = torch.randn(29, 6, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(29, (2, 5), generator=g)
    labels[0, :2] = -100
    for temperature in (1.0, 2.0):
        ours = fused_generalized_jsd_loss(hs, ws, ht, wt, labels, beta=0.3,
                                          temperature=temperature)
        theirs = trl_gkd.GKDTrainer.generalized_jsd_loss(hs @ ws.T, ht @ wt.T, labels, beta=0.3,
                                                         temperature=temperature)
        assert rel(ours, theirs) < 1e-10  # float64 throughout
    none = fused_generalized_jsd_loss(hs, ws, ht, wt, torch.full_like(labels, -100))
    none.backward()
    assert none.item() == 0 and not hs.grad.any()


class Recording(FusedGKDTrainer):
    """Records each generated batch and each batch the loss sees."""

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        out = FusedGKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
        self.generated.append((inputs["prompts"].shape[1], out[0]))
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"])
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_trl_training_steps_run_with_fastkd_and_on_policy_generation(tmp_path):
    student, teacher = models()
    before = copy.deepcopy(student.state_dict())
    run = trainer(Recording, student, teacher, tmp_path, lmbda=1.0, max_steps=3,
                  max_new_tokens=3, beta=1.0, per_device_train_batch_size=2)
    run.seen, run.generated = [], []
    run.train()
    losses = [r["loss"] for r in run.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # lmbda = 1: every batch the loss saw is the prompts plus <= 3 tokens the student sampled
    assert len(run.generated) == 3
    for (prompt_width, generated), seen in zip(run.generated, run.seen, strict=True):
        assert seen is generated and prompt_width < seen.shape[1] <= prompt_width + 3
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_fused_gkd_loss_and_gradients_equal_trls_for_soft_capped_gemma2(tmp_path):
    """Gemma 2 student and teacher with small caps (TRL's loss reads their capped logits;
    FusedGKDTrainer passes each model's cap to the fused loss). The conversations have one
    length: Gemma 2's eager attention softmaxes in fp32, where a float64 padding mask is -inf,
    so the float64 oracle would give NaN at left-padded positions."""
    from tests.test_distill_families import gemma2

    student, teacher = gemma2(cap=3.0, width=16, layers=1, seed=5), gemma2(cap=2.0)
    ours = trainer(FusedGKDTrainer, copy.deepcopy(student), copy.deepcopy(teacher),
                   tmp_path / "ours", beta=0.5)
    oracle = trainer(trl_gkd.GKDTrainer, copy.deepcopy(student).double(),
                     copy.deepcopy(teacher).double(), tmp_path / "f64", beta=0.5)
    g = torch.Generator().manual_seed(3)

    def words(k: int) -> str:
        return " ".join(f"w{int(w)}" for w in torch.randint(3, h.VOCAB, (k,), generator=g))

    batch = ours.data_collator([{"messages": [{"role": "user", "content": words(4)},
                                              {"role": "assistant", "content": words(3)}]}
                                for _ in range(4)])
    assert bool(batch["attention_mask"].all())  # no padding
    loss, grads = loss_and_grads(ours, batch, 37)
    ref_loss, ref_grads = loss_and_grads(oracle, batch, 37)
    # the precision argument of the test above; tanh adds one fp32 rounding per logit
    assert torch.isfinite(loss) and rel(loss, ref_loss) < 1e-5
    for name, ref in ref_grads.items():
        assert rel(grads[name], ref) < 3e-5, (name, rel(grads[name], ref))
