"""Evaluation during training (`eval_steps`) from `fastkd distill --config`: the held-out KD
loss, CE and perplexity of the student (and the teacher's once) at the evaluation steps equal
float64 references computed from the saved models, they reach metrics.jsonl and tensorboard,
and `save_best` keeps the student of the lowest held-out KD loss."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from fastkd.distill import DistillConfig
from fastkd.distill.cli import main
from tests.distill_helpers import held_out_reference, llama, tokenizer, write_texts


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill_eval")
    llama(seed=0).save_pretrained(root / "teacher")
    tokenizer().save_pretrained(root / "teacher")
    llama(width=16, layers=1, seed=3).save_pretrained(root / "student")
    tokenizer().save_pretrained(root / "student")
    values = {"student": str(root / "student"), "teachers": [str(root / "teacher")],
              "data": str(write_texts(root / "train.jsonl", 30)),
              "eval_data": str(write_texts(root / "eval.jsonl", 7, seed=1)),
              "output_dir": str(root / "run"), "seq_len": 16, "batch_size": 3,
              "steps": 4, "eval_steps": 2, "save_best": True, "logging_steps": 1,
              "hard_weight": 0.3, "temperature": 1.5, "learning_rate": 0.05,
              "report_to": ["tensorboard"]}
    (root / "cfg.yaml").write_text(yaml.safe_dump(values))
    assert main(["distill", "--config", str(root / "cfg.yaml")]) == 0
    lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "values": values, "evals": [x for x in lines if "eval_ce" in x],
            "losses": [x["step"] for x in lines if "loss" in x]}


def test_evaluations_are_logged_at_the_eval_steps(run):
    assert [e["step"] for e in run["evals"]] == [2, 4]
    assert run["losses"] == [1, 2, 3, 4]  # evaluation leaves the training logs in place
    first, last = run["evals"]
    assert "eval_teacher_ce" in first and "eval_teacher_ce" not in last  # the teacher once
    for e in run["evals"]:
        assert e["eval_perplexity"] == pytest.approx(math.exp(e["eval_ce"]), rel=1e-12)
    assert first["eval_teacher_perplexity"] == pytest.approx(
        math.exp(first["eval_teacher_ce"]), rel=1e-12)


def test_last_evaluation_equals_float64_reference_of_the_final_student(run):
    root, values = run["root"], run["values"]
    student = AutoModelForCausalLM.from_pretrained(root / "run" / "final").double()
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher").double()
    reference = held_out_reference(student, teacher, values, temperature=1.5, hard_weight=0.3)
    last = run["evals"][-1]
    # the trainer computes in float32 (fused loss, and the model's own CE) against a float64
    # reference of the same weights: float32 rounding (2^-24 ~ 6e-8) over V = 97-term sums
    # and a 1-layer decoder stays far below 1e-5 relative.
    assert last["eval_kd_loss"] == pytest.approx(reference["kd"], rel=1e-5)
    assert last["eval_ce"] == pytest.approx(reference["ce"], rel=1e-5)
    assert run["evals"][0]["eval_teacher_ce"] == pytest.approx(reference["teacher_ce"], rel=1e-5)


def test_save_best_keeps_the_lowest_held_out_kd_loss(run):
    best_dir = run["root"] / "run" / "best"
    record = json.loads((best_dir / "best.json").read_text())
    best = min(run["evals"], key=lambda e: e["eval_kd_loss"])
    assert record["step"] == best["step"]
    assert record["eval_kd_loss"] == best["eval_kd_loss"]
    assert (best_dir / "model.safetensors").is_file() and (best_dir / "tokenizer.json").is_file()
    kept = AutoModelForCausalLM.from_pretrained(best_dir)
    final = AutoModelForCausalLM.from_pretrained(run["root"] / "run" / "final")
    same = all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(),
                                                  final.state_dict().values(), strict=True))
    assert same == (best["step"] == 4)


def test_evaluations_reach_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run["root"] / "run" / "runs").rglob("events.out.tfevents.*")
    board = EventAccumulator(str(events.parent))
    board.Reload()
    tags = board.Tags()["scalars"]
    tag = next(t for t in tags if re.search(r"eval.kd_loss$", t))
    assert [s.step for s in board.Scalars(tag)] == [2, 4]
    assert [s.value for s in board.Scalars(tag)] == pytest.approx(
        [e["eval_kd_loss"] for e in run["evals"]], rel=1e-6)


@pytest.mark.parametrize("values, message", [
    ({"eval_steps": 5}, "eval_steps needs eval_data"),
    ({"save_best": True}, "save_best needs eval_steps"),
    ({"eval_steps": 0, "eval_data": "e"}, "eval_steps must be >= 1"),
    ({"best_metric": "loss"}, "unknown best_metric 'loss'"),
    ({"report_to": ["mlflow"]}, "unknown report_to entry 'mlflow'"),
])
def test_bad_evaluation_settings_are_refused(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DistillConfig.from_dict({"student": "s", "teachers": ["t"], **values})


def test_wandb_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as done:
        main(["distill", "--student", "s", "--teachers", "t", "--data", "d",
              "--report-to", "wandb", "--output-dir", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wandb package is not installed" in err
