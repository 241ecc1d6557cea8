"""Gemma 2, Gemma 3 (text), Granite and Cohere students and teachers: each model's logit
transform (soft-cap, logit scale) is read from it, and the trainer's loss, the held-out CE and
perplexity, `fastkd distill --config` and training from a capture equal float64 references on
the models' own `model(...).logits`, which include the transforms. The caps are small (2-3)
against logits of std ~4, so a loss that ignored a transform would be far off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    PreTrainedModel,
)

from fastkd.distill import DistillationTrainer, LogitKD
from fastkd.distill.capture import loss_in_forward
from fastkd.distill.cli import main
from fastkd.distill.config import DistillConfig
from fastkd.distill.data import CausalCollator
from fastkd.distill.heads import logit_transform, output_head
from fastkd.distill.signals import CapturedSignals
from tests.distill_helpers import (
    VOCAB,
    args,
    check_trainer_against_reference,
    held_out_reference,
    llama,
    model_inputs,
    reference_loss,
    rows,
    tokenizer,
    write_texts,
)
from tests.test_capture_signals import sparse_kl64

ROOT = Path(__file__).resolve().parent.parent
BATCH = CausalCollator(0)(rows(3, seed=7))
SPREAD = 40.0  # lm_head scale: emitted logits of std ~3, raw ones beyond the caps below


def _common(width: int, layers: int, tied: bool) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
                eos_token_id=1, bos_token_id=2)


def _spread(model: PreTrainedModel, factor: float = SPREAD) -> PreTrainedModel:
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def gemma2(cap: float | None = 2.0, width: int = 24, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return _spread(Gemma2ForCausalLM(Gemma2Config(
        **_common(width, layers, False), head_dim=8, query_pre_attn_scalar=8,
        sliding_window=8, final_logit_softcapping=cap, attn_implementation="eager")))


def gemma3(cap: float = 3.0, width: int = 16, layers: int = 1, seed: int = 1):
    torch.manual_seed(seed)
    return _spread(Gemma3ForCausalLM(Gemma3TextConfig(
        **_common(width, layers, False), head_dim=8, query_pre_attn_scalar=8,
        sliding_window=8, final_logit_softcapping=cap)))


def granite(logits_scaling: float = 4.0, width: int = 24, layers: int = 2, seed: int = 2):
    torch.manual_seed(seed)
    return _spread(GraniteForCausalLM(GraniteConfig(
        **_common(width, layers, False), logits_scaling=logits_scaling)), SPREAD * logits_scaling)


def cohere(logit_scale: float = 0.25, width: int = 16, layers: int = 1, seed: int = 3):
    torch.manual_seed(seed)
    return _spread(CohereForCausalLM(CohereConfig(
        **_common(width, layers, False), logit_scale=logit_scale)), SPREAD / abs(logit_scale))


def trainer_for(tmp_path, student, teachers, kd=None):
    return DistillationTrainer(model=student, args=args(tmp_path), teachers=teachers,
                               kd=kd or LogitKD(), data_collator=CausalCollator(0),
                               train_dataset=rows(4))


@pytest.mark.parametrize("make, expected", [
    (gemma2, (2.0, 1.0)), (gemma3, (3.0, 1.0)), (granite, (None, 0.25)),
    (cohere, (None, 0.25)), (lambda: gemma2(cap=None), (None, 1.0)),
])
def test_each_family_emits_its_transform_of_the_lm_head(make, expected):
    model = make()
    assert model.config.get_text_config() is model.config  # a text-only CausalLM config
    assert logit_transform(model) == expected
    with torch.no_grad():
        logits = model(**model_inputs(BATCH)).logits
        hidden = model.model(**model_inputs(BATCH)).last_hidden_state
        head = output_head(model, VOCAB)
        raw = hidden @ head.weight.T
        assert torch.allclose(head.emitted(raw), logits, rtol=1e-6, atol=1e-6)
    # far from uniform distributions: at each position logits range over > 3 (e^3 = 20x)
    assert float((logits.amax(-1) - logits.amin(-1)).min()) > 3
    if expected != (None, 1.0):  # the transform changes the logits a lot
        assert (raw - logits).abs().max() > 2.0


def test_transforms_fastkd_does_not_read_are_refused(tmp_path):
    model = gemma2()
    model.config.logit_scale = 2.0  # not applied by Gemma 2's forward
    with pytest.raises(ValueError, match="Gemma2ForCausalLM sets config.logit_scale=2.0"):
        logit_transform(model, "student")
    model = llama()
    model.config.final_logit_softcapping = 30.0  # not applied by Llama's forward
    with pytest.raises(ValueError, match="LlamaForCausalLM sets config.final_logit_softcapping"):
        logit_transform(model, "teacher")
    model = granite()
    model.config.output_multiplier = 0.5
    with pytest.raises(ValueError, match="output_multiplier"):
        trainer_for(tmp_path, model, [llama()])
    with pytest.raises(ValueError, match="logit scale must be > 0"):
        logit_transform(cohere(logit_scale=-1.0))


def test_a_forward_that_does_not_apply_the_read_transform_is_refused(monkeypatch):
    import fastkd.distill.heads as heads

    model = gemma2()
    model.config.final_logit_softcapping = None  # the forward now applies no cap, while
    monkeypatch.setattr(heads, "logit_transform", lambda *_: (2.0, 1.0))  # cap 2 is read
    with pytest.raises(ValueError, match="Gemma2ForCausalLM: its logits are not its "
                                         "lm_head's output"):
        loss_in_forward(model, BATCH["input_ids"], BATCH["attention_mask"], VOCAB,
                        lambda hidden, head: (hidden @ head.weight.T).sum())


CASES = [
    # (student, teacher, LogitKD settings): families mixed, and one family on both sides
    (lambda: gemma2(width=16, layers=1, seed=5), llama, dict()),
    (lambda: llama(width=16, layers=1, seed=3), gemma2,
     dict(divergence="reverse_kl", temperature=2.0, hard_weight=0.3)),
    (gemma3, granite, dict(divergence="jsd", beta=0.3, temperature=0.7, hard_weight=1.0)),
    (cohere, lambda: gemma2(cap=3.0), dict(hard_weight=0.5)),
    (lambda: granite(width=16, layers=1, seed=6), cohere, dict(temperature=1.5)),
    (lambda: gemma2(width=16, layers=1, seed=5), gemma2, dict(soft_weight=0.0,
                                                              hard_weight=1.0)),
]


@pytest.mark.parametrize("make_student, make_teacher, settings", CASES)
def test_loss_and_gradients_match_reference(tmp_path, make_student, make_teacher, settings):
    student, teacher = make_student(), make_teacher()
    trainer = trainer_for(tmp_path, student, [teacher], LogitKD(**settings))
    # tanh and the scales add a few fp32 roundings per logit, within the helper's bounds
    check_trainer_against_reference(trainer, student, [teacher], settings, BATCH)


@pytest.mark.parametrize("fusion", ["mixture", "weighted_kl"])
def test_multi_teacher_of_mixed_families_matches_reference(tmp_path, fusion):
    teachers = [gemma2(seed=10), cohere(seed=11), llama(seed=12)]
    student = granite(width=16, layers=1, seed=13)
    settings = dict(fusion=fusion, temperature=1.5, hard_weight=0.2)
    trainer = trainer_for(tmp_path, student, teachers, LogitKD(**settings))
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(BATCH))
        ref = reference_loss(student, teachers, BATCH, **settings)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_on_policy_batches_of_a_capped_student_match_reference(tmp_path):
    """On-policy: a Gemma 2 student samples completions (generate applies its cap), scored
    against a Cohere teacher with the student's and the teacher's transforms."""
    from fastkd.distill.on_policy import OnPolicyRollouts
    from fastkd.distill.on_policy_settings import OnPolicySettings

    student, teacher = gemma2(width=16, layers=1, seed=5), cohere()
    roll = OnPolicyRollouts(OnPolicySettings(lmbda=1.0, max_new_tokens=4, prompt_tokens=5),
                            LogitKD(), seed=0, pad_token_id=0, eos_token_id=None)
    trainer = DistillationTrainer(model=student, args=args(tmp_path), teachers=[teacher],
                                  kd=LogitKD(hard_weight=0.5), train_dataset=rows(4),
                                  data_collator=CausalCollator(0), on_policy=roll)
    batch = roll.rollout(student, CausalCollator(0)(rows(4)), 0, 0)
    assert int((batch["labels"][:, 1:] != -100).sum()) == 4 * 4  # completion tokens only
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ref = reference_loss(student, [teacher], batch, divergence="reverse_kl")
    ref.backward()
    # as tests/test_distill_on_policy.py: fp32 against float64, 1e-5 on the loss, 3e-5 on
    # the gradients
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    for g, p in zip(grads, student.parameters(), strict=True):
        assert (g - p.grad).norm() <= 3e-5 * p.grad.norm()


# --- fastkd distill / capture on saved Gemma 2 models ------------------------------------

SEQ_LEN = 16


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    made = {"teacher": gemma2(cap=2.0, seed=20), "student": gemma2(cap=3.0, width=16,
                                                                    layers=1, seed=21)}
    out = {}
    for name, model in made.items():
        model.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        out[name] = str(root / name)
    out["data"] = str(write_texts(root / "train.jsonl", 24))
    out["eval"] = str(write_texts(root / "eval.jsonl", 6, seed=1))
    out["root"] = str(root)
    return out


def example_config(dirs, tmp_path, **overrides) -> DistillConfig:
    """examples/distill_gemma2.yaml with the tiny models, data and a short run."""
    values = yaml.safe_load((ROOT / "examples" / "distill_gemma2.yaml").read_text())
    values["student"] = {**values["student"], "path": dirs["student"]}
    values["teachers"] = [{**values["teachers"][0], "path": dirs["teacher"]}]
    values["teachers"][0].pop("revision", None)  # a local directory has no hub revisions
    values.update(data=dirs["data"], output_dir=str(tmp_path / "run"), seq_len=SEQ_LEN,
                  steps=2, batch_size=4, logging_steps=1, save_steps=10, **overrides)
    path = tmp_path / "gemma2.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_example_config_distills_gemma2_with_per_model_options(dirs, tmp_path):
    from fastkd.distill.run import prepare

    cfg = DistillConfig.from_file(example_config(dirs, tmp_path))
    assert isinstance(cfg.teachers[0], dict) and cfg.teacher_entries[0].dtype == "bfloat16"
    job = prepare(cfg)
    (teacher,) = job.trainer.teachers
    assert teacher.dtype == torch.bfloat16 and job.trainer.model.dtype == torch.float32
    assert teacher.config._attn_implementation == "eager"
    assert job.trainer.model.config._attn_implementation == "eager"
    assert job.trainer.source.heads[0].softcap == 2.0
    job()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2] and all(math.isfinite(x["loss"]) for x in steps)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_cli_run_and_held_out_evaluation_match_float64_reference(dirs, tmp_path, capsys):
    """`fastkd distill --config` with a Gemma 2 student and teacher (float32 here, so that the
    evaluation is compared with float64 at fp32 precision)."""
    config = example_config(dirs, tmp_path, eval_data=dirs["eval"], eval_steps=2,
                            hard_weight=0.3, temperature=1.5)
    values = yaml.safe_load(config.read_text())
    values["teachers"][0]["dtype"] = "float32"
    config.write_text(yaml.safe_dump(values))
    assert main(["distill", "--config", str(config)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (last,) = [x for x in lines if "eval_ce" in x]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").double()
    teacher = AutoModelForCausalLM.from_pretrained(dirs["teacher"]).double()
    assert student.config.final_logit_softcapping == 3.0
    reference = held_out_reference(student, teacher, values, temperature=1.5, hard_weight=0.3)
    # fp32 training-side computation against float64 of the same weights (as
    # tests/test_distill_eval.py): well under 1e-5 relative
    assert last["eval_kd_loss"] == pytest.approx(reference["kd"], rel=1e-5)
    assert last["eval_ce"] == pytest.approx(reference["ce"], rel=1e-5)
    assert last["eval_perplexity"] == pytest.approx(math.exp(reference["ce"]), rel=1e-5)
    assert last["eval_teacher_ce"] == pytest.approx(reference["teacher_ce"], rel=1e-5)


def capture_args(dirs, out, *extra: str) -> list[str]:
    return ["capture", "--student", dirs["student"], "--teachers", dirs["teacher"],
            "--data", dirs["data"], "--seq-len", str(SEQ_LEN), "--batch-size", "4",
            "--out", str(out), *extra]


def run_cfg(dirs, tmp_path, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], data=dirs["data"], seq_len=SEQ_LEN, steps=1,
                batch_size=64, logging_steps=1, output_dir=str(tmp_path / "run"),
                learning_rate=0.0, training_args={"save_strategy": "no", "disable_tqdm": True})
    return DistillConfig(**{**base, **kw})


def one_step_loss(cfg: DistillConfig) -> float:
    from fastkd.distill.run import prepare

    job = prepare(cfg)
    job.trainer.train()
    return job.trainer.state.log_history[0]["loss"]


@torch.no_grad()
def logits64(model_dir: str, cfg: DistillConfig) -> tuple[list[torch.Tensor], list, list]:
    """Each training block's (L, V) float64 logits (as the model emits them: capped), with
    the blocks and their shifted targets."""
    from fastkd.distill.run import token_blocks

    blocks = token_blocks(cfg, cfg.student, "student")[1]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    logits = [model(input_ids=torch.tensor([r]), position_ids=torch.tensor([p]),
                    use_cache=False).logits[0]
              for r, p in zip(blocks["input_ids"], blocks["position_ids"], strict=True)]
    return logits, blocks["input_ids"], [torch.tensor(x[1:]) for x in blocks["labels"]]


def test_capture_of_a_capped_teacher_and_training_from_it(dirs, tmp_path):
    topk, hidden = tmp_path / "topk", tmp_path / "hidden"
    assert main(capture_args(dirs, topk, "--kind", "topk", "--k", "8")) == 0
    assert main(capture_args(dirs, hidden, "--kind", "hidden", "--dtype", "float32")) == 0
    cfg = run_cfg(dirs, tmp_path, teacher_signals=[str(topk)], hard_weight=0.5)
    teacher_z, blocks, targets = logits64(dirs["teacher"], cfg)
    student_z, _, _ = logits64(dirs["student"], cfg)
    cap = CapturedSignals(topk)
    assert (cap.meta.teacher_softcap, cap.meta.teacher_logit_scale) == (2.0, 1.0)
    assert CapturedSignals(hidden).head().softcap == 2.0
    for row, z in enumerate(teacher_z):
        got = cap.row(row)
        assert got["input_ids"].tolist() == blocks[row]
        # the stored logits are the capped ones (|z| < 2), fp32 rounding of a few layers
        assert float(z.abs().max()) < 2.0 and float(got["logits"].abs().max()) < 2.0
        atol = 1e-5
        ids = got["ids"].long()
        assert torch.allclose(got["logits"].double(), z.gather(1, ids), atol=atol, rtol=0)
        assert (got["logits"].double()[:, -1] >= z.topk(8, dim=-1).values[:, 7] - atol).all()
        assert torch.allclose(got["lse"][:, 0].double(), torch.logsumexp(z, -1), atol=atol,
                              rtol=0)
    # training from the top-k capture: the student's capped logits against the capture
    loss = one_step_loss(cfg)
    total, count = 0.0, 0
    for row, (zs, zt, labels) in enumerate(zip(student_z, teacher_z, targets, strict=True)):
        ids = cap.row(row)["ids"].long()[:-1]
        counted = labels != -100
        kl = sparse_kl64(zs[:-1][counted], zt[:-1][counted], ids[counted], 1.0)
        ce = F.cross_entropy(zs[:-1][counted], labels[counted], reduction="none")
        total += float((kl + 0.5 * ce).sum())
        count += int(counted.sum())
    assert abs(loss - total / count) <= 1e-4 * abs(total / count)
    # a float32 hidden capture: the same loss as the live capped teacher
    online = one_step_loss(run_cfg(dirs, tmp_path, teachers=[dirs["teacher"]]))
    stored = one_step_loss(run_cfg(dirs, tmp_path, teacher_signals=[str(hidden)]))
    assert abs(stored - online) <= 1e-6 * abs(online)
