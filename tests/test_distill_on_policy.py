"""On-policy distillation in `fastkd distill`: settings checks before any model loads, the
rollouts (prompt labels ignored, EOS handling, seeded), the loss on generated batches against
the float64 reference on completion tokens only, lambda = 0 training exactly as before, and a
CLI run that logs completion length and generation time."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd.distill import DistillationTrainer, DistillConfig, LogitKD
from fastkd.distill.cli import main
from fastkd.distill.data import CausalCollator
from fastkd.distill.on_policy import OnPolicyRollouts, block_prefix, rollouts_from_config
from fastkd.distill.on_policy_settings import OnPolicySettings
from tests.distill_helpers import (
    VOCAB,
    args,
    llama,
    qwen2,
    reference_loss,
    rows,
    tokenizer,
    write_texts,
)

EOS = 1


@pytest.mark.parametrize("value, error, message", [
    (1.5, ValueError, "on_policy lambda must be in [0, 1], got 1.5"),
    ({"lambda": 0.5, "temperature": 0}, ValueError, "on_policy temperature must be > 0"),
    ({"lambda": 0.5, "max_new_tokens": 0}, ValueError, "on_policy max_new_tokens must be >= 1"),
    ({"lambda": 0.5, "divergence": "kld"}, ValueError, "unknown on_policy divergence 'kld'"),
    ({"lambda": 0.5, "divergence": "jsd", "beta": 2}, ValueError, "on_policy beta must be in"),
    ({"lambda": 0.5, "lenght": 3}, ValueError, "unknown on_policy key(s) ['lenght']"),
    ({"lambda": "half"}, TypeError, "on_policy lambda expects float, got 'half'"),
    ({"lambda": 0.5, "max_new_tokens": 2.5}, TypeError, "max_new_tokens expects int"),
    ({"lambda": 0.5, "prompt_tokens": 10, "max_new_tokens": 10}, ValueError,
     "prompt_tokens + max_new_tokens = 10 + 10 exceeds seq_len=16"),
    ("0.5", TypeError, "config key 'on_policy' expects"),
])
def test_bad_on_policy_settings_are_refused(value, error, message):
    with pytest.raises(error) as info:
        DistillConfig(student="s", teachers=["t"], seq_len=16, on_policy=value)
    assert message in str(info.value)


def test_a_capture_cannot_score_samples():
    with pytest.raises(ValueError, match="on_policy needs teacher models"):
        DistillConfig(student="s", teacher_signals=["capture"], seq_len=64, on_policy=0.5)
    DistillConfig(student="s", teacher_signals=["capture"], seq_len=64, on_policy=0.0)


def test_the_ablation_refuses_on_policy():
    with pytest.raises(ValueError, match="on_policy is not one of the ablation's runs"):
        DistillConfig(ablation=True, on_policy=0.5)


def test_on_policy_settings_from_a_number_a_mapping_and_yaml_strings():
    assert OnPolicySettings.from_value(None) is None
    assert OnPolicySettings.from_value(0.25) == OnPolicySettings(lmbda=0.25)
    got = OnPolicySettings.from_value({"lambda": "1e-1", "temperature": 0.7,
                                       "max_new_tokens": 8, "divergence": "jsd", "beta": 0.2})
    assert got == OnPolicySettings(0.1, 0.7, 8, 16, "jsd", 0.2)
    assert got.divergence == "jsd" and OnPolicySettings().divergence == "reverse_kl"


def test_cli_errors_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import fastkd.distill.run as run

    def no_loads(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run, "load_model", no_loads)
    with pytest.raises(SystemExit) as info:
        main(["distill", "--student", "s", "--teachers", "t", "--data", "d",
              "--on-policy", "-0.1", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "on_policy lambda must be in [0, 1], got -0.1" in err


def test_the_flag_sets_the_lambda_of_the_files_mapping(tmp_path, monkeypatch):
    import fastkd.distill.cli as cli

    seen = {}
    monkeypatch.setattr(DistillConfig, "check_runtime", lambda self: seen.setdefault("cfg", self))

    def stop(cfg):
        raise ValueError("stop here")

    monkeypatch.setattr("fastkd.distill.run.prepare", stop)
    (tmp_path / "c.yaml").write_text("student: s\nteachers: [t]\ndata: d\n"
                                     "on_policy: {lambda: 0.2, max_new_tokens: 4}\n")
    with pytest.raises(SystemExit):
        cli.main(["distill", "--config", str(tmp_path / "c.yaml"), "--on-policy", "0.6"])
    assert seen["cfg"].on_policy == {"lambda": 0.6, "max_new_tokens": 4}


def rollouts(lmbda=1.0, eos=EOS, **kw):
    return OnPolicyRollouts(OnPolicySettings(lmbda=lmbda, **kw), LogitKD(), seed=0,
                            pad_token_id=0, eos_token_id=eos)


def test_a_rollout_is_the_prompt_plus_sampled_tokens_with_the_prompt_ignored():
    batch = CausalCollator(0)(rows(3))
    student = qwen2()
    state = torch.random.get_rng_state()
    roll = rollouts(eos=None, max_new_tokens=5, prompt_tokens=4)
    out = roll.rollout(student, batch, step=0, index=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert out["on_policy"] and ids.shape == (3, 4 + 5)
    assert torch.equal(ids[:, :4], batch["input_ids"][:, :4])
    assert (labels[:, :4] == -100).all() and torch.equal(labels[:, 4:], ids[:, 4:])
    assert mask.all()
    again = roll.rollout(student, batch, step=0, index=0)
    other = roll.rollout(student, batch, step=1, index=0)
    assert torch.equal(again["input_ids"], ids)  # seeded by (seed, step, index)
    assert not torch.equal(other["input_ids"], ids)
    metrics = roll.flush()
    assert metrics["on_policy_completion_len"] == 5 and metrics["on_policy_generation_s"] > 0
    assert "on_policy_fraction" not in metrics  # no batch was chosen, three were generated
    assert roll.flush() == {}  # flushed
    assert [roll.chosen(0, k) for k in range(3)] == [True] * 3
    assert not any(rollouts(lmbda=0.0).chosen(0, k) for k in range(3))


def favour(model, token: int, after: int):
    """From the lm_head's call `after` + 1 on (one call per sampled token), the student picks
    `token`."""
    calls = {"n": 0}

    def hook(_module, _args, output):
        calls["n"] += 1
        if calls["n"] <= after:
            return None
        output = output.clone()
        output[:, -1, token] += 1e4
        return output

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("where", ["tokenizer", "generation_config"])
def test_completions_end_at_eos_and_batches_with_prompts_use_them(where):
    student = qwen2()
    stop = EOS if where == "tokenizer" else 5
    if where == "generation_config":  # a model's own stop tokens end completions too
        student.generation_config.eos_token_id = [stop]
    favour(student, stop, after=2)  # two free tokens, then the stop token
    prompts = {"prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
               "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    batch = {**CausalCollator(0)(rows(2)), **prompts}
    assert block_prefix(batch, 16) == (prompts["prompt_ids"], prompts["prompt_mask"])
    roll = rollouts(eos=EOS if where == "tokenizer" else None, max_new_tokens=6)
    out = roll.rollout(student, batch, 0, 0)
    completion, mask, labels = out["input_ids"][:, 3:], out["attention_mask"], out["labels"]
    assert torch.equal(mask[:, :3], prompts["prompt_mask"])
    for row in range(2):
        n = int(mask[row, 3:].sum())
        assert n == 3 and completion[row, 2] == stop  # the stop token is kept and counted
        assert (labels[row, 3 + n:] == -100).all() and (completion[row, n:] == 0).all()
    assert roll.flush()["on_policy_completion_len"] == 3


def test_the_loss_of_a_generated_batch_is_reverse_kl_on_completion_tokens(tmp_path):
    student, teacher = qwen2(), llama()
    with torch.no_grad():  # logits with a realistic spread
        student.model.norm.weight.mul_(60)
        teacher.model.norm.weight.mul_(50)
    roll = rollouts(eos=None, max_new_tokens=4, prompt_tokens=5)
    trainer = DistillationTrainer(model=student, args=args(tmp_path), teachers=[teacher],
                                  kd=LogitKD(hard_weight=0.5), train_dataset=rows(4),
                                  data_collator=CausalCollator(0), on_policy=roll)
    batch = roll.rollout(student, CausalCollator(0)(rows(4)), 0, 0)
    student.zero_grad()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ref = reference_loss(student, [teacher], batch, divergence="reverse_kl")
    ref.backward()
    # fp32 against float64: dot products of <= 97 terms and log-sum-exps over V = 97 (relative
    # ~ K 2^-24 ~ 6e-6 each, a few chained) bound the loss at 1e-5 and gradients at 3e-5.
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    for g, p in zip(grads, student.parameters(), strict=True):
        assert (g - p.grad).norm() <= 3e-5 * p.grad.norm()
    # only the 4 completion tokens of each row count; the same loss on the full rows differs
    assert int((batch["labels"][:, 1:] != -100).sum()) == 4 * 4


def train(tmp_path, on_policy, **kw):
    student = qwen2()
    trainer = DistillationTrainer(
        model=student, args=args(tmp_path, max_steps=3, **kw), teachers=[llama()],
        kd=LogitKD(), train_dataset=rows(8), data_collator=CausalCollator(0),
        on_policy=on_policy)
    trainer.train()
    return student, trainer.state.log_history


def test_lambda_zero_trains_exactly_as_without_on_policy(tmp_path):
    assert rollouts_from_config(0.0, LogitKD(), 0, 0, EOS) is None
    assert rollouts_from_config({"lambda": 0, "max_new_tokens": 3}, LogitKD(), 0, 0, EOS) is None
    plain, plain_log = train(tmp_path / "a", None)
    zero, zero_log = train(tmp_path / "b", rollouts_from_config(0.0, LogitKD(), 0, 0, EOS))
    some, _ = train(tmp_path / "c", rollouts(lmbda=1.0, max_new_tokens=3, prompt_tokens=4))
    for a, b in zip(plain.parameters(), zero.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [r.get("loss") for r in plain_log] == [r.get("loss") for r in zero_log]
    assert any(not torch.equal(a, c) for a, c in zip(plain.parameters(), some.parameters()))


def test_cli_on_policy_run_logs_completion_length_and_generation_time(tmp_path):
    root = tmp_path
    for name, model in (("student", llama(width=16, tied=True, layers=1, seed=3)),
                        ("teacher", llama())):
        model.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
    data = write_texts(root / "train.jsonl", 30, vocab=VOCAB)
    (root / "c.yaml").write_text("on_policy: {lambda: 1.0, prompt_tokens: 6, "
                                 "max_new_tokens: 8, temperature: 0.9}\n")
    out = []
    for run in ("one", "two"):
        assert main(["distill", "--config", str(root / "c.yaml"), "--student",
                     str(root / "student"), "--teachers", str(root / "teacher"), "--data",
                     str(data), "--seq-len", "16", "--batch-size", "2", "--steps", "4",
                     "--logging-steps", "1", "--on-policy", "0.5",
                     "--output-dir", str(root / run)]) == 0
        lines = [json.loads(x) for x in (root / run / "metrics.jsonl").read_text().splitlines()]
        out.append([x for x in lines if "loss" in x])
    one, two = out
    assert [x["loss"] for x in one] == [x["loss"] for x in two]  # deterministic given the seed
    generated = [x for x in one if x["on_policy_fraction"] > 0]
    assert generated and len(generated) < len(one)  # lambda 0.5 over 4 steps: some, not all
    for x in generated:
        assert 1 <= x["on_policy_completion_len"] <= 8 and x["on_policy_generation_s"] > 0


def test_the_tiny_demo_trains_an_on_policy_student_beside_the_kd_student(tmp_path, capsys):
    from fastkd.distill.demo import run_demo

    with pytest.raises(ValueError, match="16 \\+ 32 exceeds the tiny demo's seq_len=32"):
        run_demo(DistillConfig(demo_scale="tiny", on_policy=1.0, output_dir=str(tmp_path)))
    cfg = DistillConfig(demo_scale="tiny", output_dir=str(tmp_path), logging_steps=2,
                        on_policy={"lambda": 1.0, "prompt_tokens": 8, "max_new_tokens": 16})
    result = run_demo(cfg)
    printed = capsys.readouterr().out
    assert "[4/4] on-policy student" in printed
    record = json.loads((tmp_path / "demo_results.json").read_text())
    ppl = record["held_out_perplexity"]
    assert set(ppl) == {"teacher", "KD student", "CE student", "on-policy"}
    assert ppl["on-policy"] == result["on-policy perplexity"] and 1 < ppl["on-policy"] < 10_000
    assert record["on_policy"]["lmbda"] == 1.0 and record["steps"]["students"] == 6
    lines = [json.loads(x) for x in (tmp_path / "metrics_on_policy.jsonl").read_text().splitlines()]
    assert all(x["on_policy_completion_len"] == 16 for x in lines if "loss" in x)


def test_unpacked_conversations_are_prompted_with_their_uncounted_heads():
    """Chat rows (assistant-only loss, no packing): each row's prompt is everything before its
    first counted token, left-padded; plain-text rows (first token counted) and packed rows
    (position ids) keep the block prefix."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, 12, 13, 14, 15, -100]])
    prompts, prompt_mask = block_prefix({"input_ids": ids, "attention_mask": mask,
                                         "labels": labels}, 4)
    assert prompts.tolist() == [[5, 6, 7], [0, 0, 11]]
    assert prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    text = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    assert block_prefix(text, 4)[0].tolist() == ids[:, :4].tolist()
    packed = {**text, "labels": labels, "position_ids": torch.arange(6).repeat(2, 1)}
    assert block_prefix(packed, 4)[0].tolist() == ids[:, :4].tolist()
