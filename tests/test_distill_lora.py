"""LoRA students (peft): the trainer's loss and the adapters' gradients equal a materialized
float64 reference; an adapted lm_head is refused in one line; a LoRA run from
`fastkd distill --config` (the README's YAML) saves adapters, resumes from them and exports
the merged student."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fastkd.distill import DistillationTrainer, DistillConfig, LogitKD
from fastkd.distill.cli import main
from fastkd.distill.data import CausalCollator
from fastkd.distill.lora import LoraSettings
from tests.distill_helpers import args, llama, reference_loss, rows, tokenizer, write_texts

ROOT = Path(__file__).resolve().parent.parent


def _spread(model: torch.nn.Module, scale: float) -> None:
    """Scale the lm_head so that logits spread over several units (std ~ 3-6)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)


def test_lora_loss_and_adapter_gradients_equal_float64_reference(tmp_path):
    teacher = llama(seed=0).double()
    _spread(teacher, 40.0)
    base = llama(width=16, layers=2, seed=3).double()
    _spread(base, 60.0)
    student = LoraSettings(r=4, alpha=8.0, target_modules="all-linear").apply(base)
    torch.manual_seed(5)
    with torch.no_grad():  # peft starts lora_B at 0 (no gradient to lora_A): make both live
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    kd = LogitKD(temperature=2.0, hard_weight=0.3, backend="torch")
    trainer = DistillationTrainer(model=student, teachers=[teacher], kd=kd,
                                  args=args(tmp_path, use_cpu=True),
                                  train_dataset=rows(5, seed=2), data_collator=CausalCollator(0))
    batch = CausalCollator(0)(rows(5, seed=2))
    reference_model = copy.deepcopy(student)
    with torch.no_grad():
        spread = reference_model(input_ids=batch["input_ids"]).logits.std()
    assert spread > 3, spread  # realistic logit spread, not near-uniform distributions

    student.train()
    loss_sum, counted = trainer.distill_loss_sum(student, batch)
    loss = loss_sum / counted
    loss.backward()
    reference = reference_loss(reference_model, [teacher], batch, temperature=2.0,
                               soft_weight=1.0, hard_weight=0.3)
    reference.backward()
    # Both in float64 from the same weights: they differ by rounding only (float64 epsilon
    # 2^-53 ~ 1e-16, amplified by the V = 97-term sums and the decoder's depth, far below 1e-9).
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=0)
    adapters = {n: p for n, p in student.named_parameters() if p.requires_grad}
    reference_grads = {n: p.grad for n, p in reference_model.named_parameters()
                       if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert any("lora_A" in n for n in adapters) and any("lora_B" in n for n in adapters)
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, reference_grads[name], rtol=1e-7, atol=1e-12,
                                   msg=name)
    # the base weights stay frozen (peft): only the adapters receive gradients
    assert all(p.grad is None for n, p in student.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("lora, message", [
    ({"r": 4, "target_modules": ["q_proj", "lm_head"]}, "names the output layer (lm_head)"),
    ({"r": 0}, "lora.r must be an integer >= 1"),
    ({"r": 4, "rank": 2}, "unknown lora key 'rank'"),
    ({"dropout": 1.5}, "lora.dropout must be in [0, 1)"),
])
def test_bad_lora_settings_are_refused_by_the_config(lora, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DistillConfig.from_dict({"student": "s", "teachers": ["t"], "lora": lora})


def test_an_lm_head_matched_by_a_pattern_is_refused_when_applied():
    with pytest.raises(ValueError, match="matches the output layer"):
        LoraSettings(target_modules=r".*(q_proj|lm_head)").apply(llama(width=16, layers=1))


def test_merge_lora_without_lora_is_refused():
    with pytest.raises(ValueError, match="merge_lora needs lora"):
        DistillConfig.from_dict({"student": "s", "teachers": ["t"], "merge_lora": True})




def _config(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def readme_yaml(key: str) -> dict:
    """The README's YAML example holding `key`."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(),
                        re.MULTILINE | re.DOTALL)
    found = [yaml.safe_load(b) for b in blocks if re.search(rf"^{key}:", b, re.MULTILINE)]
    assert len(found) == 1, f"one README YAML block with {key!r}"
    return found[0]


def tiny_run(tmp_path: Path, values: dict) -> dict:
    """`values` (a README example) pointed at tiny local models and data."""
    (tmp_path / "teacher").mkdir(exist_ok=True)
    llama(seed=0).save_pretrained(tmp_path / "teacher")
    tokenizer().save_pretrained(tmp_path / "teacher")
    llama(width=16, layers=1, seed=3).save_pretrained(tmp_path / "student")
    tokenizer().save_pretrained(tmp_path / "student")
    return {**values, "student": str(tmp_path / "student"),
            "teachers": [str(tmp_path / "teacher")],
            "data": str(write_texts(tmp_path / "train.jsonl", 30)),
            "eval_data": str(write_texts(tmp_path / "eval.jsonl", 6, seed=1)),
            "output_dir": str(tmp_path / "run"), "seq_len": 16, "batch_size": 2,
            "grad_accum": 1, "bf16": False, "logging_steps": 1, "training_args": {}}


def run_saves_adapters_and_resumes(tmp_path: Path, values: dict) -> Path:
    """Run `values` for 2 steps, checkpointing every step, then resume to step 3; checks the
    checkpoints and the final student hold adapters only and the steps run once each.
    Returns the output folder."""
    values = {**values, "steps": 2, "save_steps": 1}
    assert main(["distill", "--config", str(_config(tmp_path, values))]) == 0
    out = tmp_path / "run"
    for folder in (out / "checkpoint-2", out / "final"):
        assert (folder / "adapter_model.safetensors").is_file(), folder
        assert not (folder / "model.safetensors").exists(), folder  # adapters only
    # resume from the adapter checkpoint and train on to step 3
    values.update(steps=3, resume="latest")
    assert main(["distill", "--config", str(_config(tmp_path, values))]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert steps == [1, 2, 3]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    return out


def check_merged_export(out: Path, student_dir: Path) -> torch.nn.Module:
    """The merged export is a plain model whose logits are those of the full-precision student
    with the trained adapters of `out`/final; returns the merged model."""
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir),
                                        out / "final")
    changed = adapted.get_base_model().model.layers[0].self_attn.q_proj
    assert changed.lora_B["default"].weight.abs().max() > 0  # the adapters trained
    ids = torch.tensor([rows(1, seed=4)[0]["input_ids"]])
    with torch.no_grad():
        # merging adds B A * alpha / r into the float32 weight: one rounding per weight entry
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5,
                                   atol=1e-5)
    return merged


def test_readme_lora_run_saves_resumes_and_merges(tmp_path):
    example = readme_yaml("lora")
    assert example["merge_lora"] is True and "lm_head" not in example["lora"]["target_modules"]
    values = tiny_run(tmp_path, example)
    values.update(eval_steps=None, save_best=False, report_to=[], learning_rate=0.05)
    check_merged_export(run_saves_adapters_and_resumes(tmp_path, values), tmp_path / "student")


def test_resumed_lora_run_trains_like_an_uninterrupted_one(tmp_path):
    """3 steps at once and 2 steps + a resume to 3 end with the same adapters (the checkpoint
    restores the adapters, the optimizer state and the data order)."""
    values = tiny_run(tmp_path, {"lora": {"r": 4, "alpha": 8.0}, "learning_rate": 0.05,
                                 "save_steps": 2, "eval_data": None})
    values.pop("eval_data")
    # a constant learning rate: the default linear decay depends on `steps`, which differs
    values["training_args"] = {"lr_scheduler_type": "constant"}
    whole = {**values, "steps": 3, "output_dir": str(tmp_path / "whole")}
    assert main(["distill", "--config", str(_config(tmp_path, whole))]) == 0
    split = {**values, "steps": 2, "output_dir": str(tmp_path / "split")}
    assert main(["distill", "--config", str(_config(tmp_path, split))]) == 0
    assert main(["distill", "--config", str(_config(tmp_path, {**split, "steps": 3,
                                                                "resume": "latest"}))]) == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    start = LoraSettings(r=4, alpha=8.0).apply(llama(width=16, layers=1, seed=3))
    assert any(not torch.equal(v, start.state_dict()[k.replace(".weight", ".default.weight")])
               for k, v in a.items() if "lora_A" in k)  # the adapters moved
    for key in a:
        # the same float32 operations in the same order on one CPU process
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def test_lora_is_set_in_a_config_file_only(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--lora", "r=4"])
    assert "unrecognized arguments: --lora" in capsys.readouterr().err


def test_a_lora_students_forward_skips_the_full_logits_and_takes_packed_positions():
    """peft's forward takes **kwargs: the trainer reads its base model's signature, so a LoRA
    student still gets logits_to_keep=1 (no tokens x vocab logits) and the packed rows'
    position ids (was: neither, and packed training refused)."""
    from fastkd.distill.capture import _forward_kwargs

    student = LoraSettings(r=2, alpha=4.0, target_modules="all-linear").apply(llama())
    ids = torch.randint(0, 50, (1, 8))
    kwargs = _forward_kwargs(student, ids, None, torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    assert kwargs["logits_to_keep"] == 1 and kwargs["position_ids"] is not None
    assert student(**kwargs).logits.shape[1] == 1
