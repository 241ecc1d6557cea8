"""Chat and instruction data: the assistant-only loss mask, checked by hand, reaching the KD and
CE terms of the trainer's loss, and `fastkd distill` on messages data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from fastkd.distill import DistillationTrainer, LogitKD
from fastkd.distill.chat import chat_tokens, check_chat_template, detect_format, encode
from fastkd.distill.cli import main
from fastkd.distill.config import DistillConfig
from fastkd.distill.data import CausalCollator, tokenize
from fastkd.distill.loss import IGNORE_INDEX
from tests.distill_helpers import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_MARKED,
    args,
    chat_tokenizer,
    llama,
    reference_loss,
)

ROOT = Path(__file__).resolve().parent.parent
CONVERSATION = [
    {"role": "system", "content": "w3 w4"},
    {"role": "user", "content": "w5"},
    {"role": "assistant", "content": "w6 w7"},
    {"role": "user", "content": "w8"},
    {"role": "assistant", "content": "w9"},
]
# written by hand: the tokens the template renders, and which of them are the assistant's
# (its contents and their end tags, not the role tag the generation prompt supplies)
RENDERED = ("<|system|> w3 w4 <|end|> <|user|> w5 <|end|> <|assistant|> w6 w7 <|end|> "
            "<|user|> w8 <|end|> <|assistant|> w9 <|end|>").split()
ASSISTANT = [0] * 8 + [1, 1, 1] + [0] * 4 + [1, 1]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHAT_TEMPLATE_MARKED],
                         ids=["prefix_difference", "generation_markers"])
def test_assistant_mask_of_a_hand_made_conversation(template):
    tok = chat_tokenizer(template)
    ids, counted = chat_tokens(tok, CONVERSATION)
    assert tok.convert_ids_to_tokens(ids) == RENDERED
    assert [int(c) for c in counted] == ASSISTANT


def test_prompt_completion_counts_the_completion_and_eos():
    tok = chat_tokenizer()
    batch = {"prompt": ["w3 w4 w5"], "completion": ["w6 w7"]}
    ((ids, counted),) = encode(tok, batch, "prompt_completion", "text", True, False)
    assert tok.convert_ids_to_tokens(ids) == ["w3", "w4", "w5", "w6", "w7", "<eos>"]
    assert counted == [False] * 3 + [True] * 3
    ((_, everything),) = encode(tok, batch, "prompt_completion", "text", False, False)
    assert all(everything)


def test_formats_are_detected_from_the_columns():
    def columns(*names):
        return Dataset.from_dict({n: ["x"] for n in names})

    assert detect_format(columns("messages", "text"), "auto", "text", "training") == "messages"
    assert detect_format(columns("prompt", "completion"), "auto", "text",
                         "training") == "prompt_completion"
    assert detect_format(columns("body"), "auto", "body", "training") == "text"
    with pytest.raises(ValueError, match=r"has none of the columns"):
        detect_format(columns("body"), "auto", "text", "training")
    with pytest.raises(ValueError, match=r"no column\(s\) \['completion'\]"):
        detect_format(columns("prompt"), "prompt_completion", "text", "training")


def test_messages_need_a_chat_template():
    with pytest.raises(ValueError, match="has no chat_template"):
        check_chat_template(chat_tokenizer(None), "messages")
    check_chat_template(chat_tokenizer(None), "text")


def conversations(n: int) -> list[list[dict[str, str]]]:
    g = torch.Generator().manual_seed(0)

    def words(k: int) -> str:
        return " ".join(f"w{int(w)}" for w in torch.randint(3, 90, (k,), generator=g))

    return [[{"role": "system", "content": words(2)}, {"role": "user", "content": words(3 + i)},
             {"role": "assistant", "content": words(2 + i % 3)},
             {"role": "user", "content": words(2)},
             {"role": "assistant", "content": words(3)}] for i in range(n)]


@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_the_mask_reaches_the_kd_and_ce_terms(tmp_path, packing):
    """The trainer's loss (KD + CE) equals the float64 reference that counts only assistant
    tokens, and differs from the one that counts every token."""
    tok = chat_tokenizer()
    ds = Dataset.from_dict({"messages": conversations(3)})
    rows = tokenize(ds, tok, "text", 24, packing, "training", data_format="messages")
    batch = CausalCollator(0)([rows[i] for i in range(len(rows))])
    labels = batch["labels"]
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    teacher, student = llama(), llama(width=16, seed=3, layers=1)
    settings = dict(temperature=2.0, hard_weight=0.5)
    trainer = DistillationTrainer(model=student, args=args(tmp_path), teachers=[teacher],
                                  kd=LogitKD(**settings), data_collator=CausalCollator(0),
                                  train_dataset=rows)
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch)).item()
        ref = reference_loss(student, [teacher], batch, **settings).item()
        unmasked = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        everything = reference_loss(student, [teacher], {**batch, "labels": unmasked},
                                    **settings).item()
    # float32 models against a float64 reference on their logits: the fused loss's fp32 logits
    # differ by ~H * 2^-24 relative; 1e-5 leaves a margin, and the unmasked loss is far off
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    assert abs(everything - ref) > 1e-3 * abs(ref)


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("distill_chat")
    out = {}
    for name, model, tok in [("teacher", llama(), chat_tokenizer()),
                             ("student", llama(width=16, tied=True, layers=1, seed=3),
                              chat_tokenizer()),
                             ("plain", llama(width=16, tied=True, layers=1, seed=3),
                              chat_tokenizer(None))]:
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(6)))
    out["data"] = str(data)
    Dataset.from_dict({"prompt": ["w3 w4 w5", "w6 w7"], "completion": ["w8 w9", "w10 w11 w12"]}
                      ).save_to_disk(str(root / "saved"))
    out["saved"] = str(root / "saved")
    return out


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def run_example(chat_dirs, out: Path, *extra: str) -> int:
    """`fastkd distill --config examples/distill_chat.yaml` on the tiny models."""
    return main(["distill", "--config", str(ROOT / "examples" / "distill_chat.yaml"),
                 "--student", chat_dirs["student"], "--teachers", chat_dirs["teacher"],
                 "--data", chat_dirs["data"], "--seq-len", "32", "--batch-size", "2",
                 "--steps", "2", "--logging-steps", "1", "--output-dir", str(out), *extra])


def test_example_config_distills_chat_data(chat_dirs, tmp_path):
    cfg = DistillConfig.from_file(ROOT / "examples" / "distill_chat.yaml")
    assert cfg.data_format == "messages" and cfg.assistant_only_loss and cfg.packing
    assert run_example(chat_dirs, tmp_path / "run", "--eval-data", chat_dirs["data"]) == 0
    assert len(losses(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_prompt_completion_from_a_saved_dataset(chat_dirs, tmp_path):
    assert run_example(chat_dirs, tmp_path / "run", "--data", chat_dirs["saved"],
                       "--data-format", "auto", "--no-packing") == 0
    assert len(losses(tmp_path / "run")) == 2


def test_messages_without_a_template_fail_before_any_model_loads(chat_dirs, tmp_path, capsys,
                                                                 monkeypatch):
    import fastkd.distill.run as run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run, "load_model", no_model)
    with pytest.raises(SystemExit) as exit_info:
        run_example(chat_dirs, tmp_path / "run", "--student", chat_dirs["plain"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"holds 'messages', but the tokenizer .* has no chat_template", err)
    assert err.count("\n") == 1, err


def test_on_policy_distillation_of_chat_data_runs_end_to_end(chat_dirs, tmp_path):
    """--on-policy on unpacked chat rows: the student answers each conversation's prompt."""
    assert run_example(chat_dirs, tmp_path / "run", "--no-packing", "--seq-len", "64",
                       "--on-policy", "1") == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 2 and all(x["on_policy_fraction"] == 1.0 for x in steps)
    assert all(x["on_policy_completion_len"] > 0 for x in steps)
