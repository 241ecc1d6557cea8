"""QLoRA students (peft over a 4-bit NF4 base from bitsandbytes, on CPU here): the trainer's
loss and adapter gradients equal a materialized reference on the same quantized model, the
lm_head stays full precision, and a `fastkd distill --config` run saves adapters, resumes and
exports the adapters merged into the full-precision base."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fastkd.distill import DistillationTrainer, DistillConfig, LogitKD
from fastkd.distill.cli import main
from fastkd.distill.data import CausalCollator
from fastkd.distill.lora import LoraSettings
from fastkd.distill.models import load_model
from tests.distill_helpers import args, llama, reference_loss, rows
from tests.helpers import rel_err
from tests.test_distill_lora import (
    _config,
    _spread,
    check_merged_export,
    run_saves_adapters_and_resumes,
    tiny_run,
)

# Widths are multiples of 64, bitsandbytes' 4-bit block: on CPUs with AVX512-BF16 its inference
# path repacks the weights by blocks of 64 and fails on narrower layers (bitsandbytes 0.50).
QLORA = LoraSettings(r=4, alpha=8.0, target_modules="all-linear", qlora=True)


def quantized_student(tmp_path: Path) -> torch.nn.Module:
    base = llama(width=64, layers=2, seed=3)  # in-features a multiple of 64 (below)
    _spread(base, 60.0)
    base.save_pretrained(tmp_path / "student")
    return load_model(str(tmp_path / "student"), "student",
                      quantization=(QLORA.quantization_config(torch.float32), "cpu"))


def test_qlora_base_is_4bit_and_its_head_full_precision(tmp_path):
    import bitsandbytes as bnb

    student = QLORA.apply(quantized_student(tmp_path))
    layer = student.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.base_layer.weight.quant_type == "nf4"
    head = student.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert not head.weight.requires_grad  # the base, head included, is frozen
    assert all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)


def test_qlora_loss_and_adapter_gradients_equal_materialized_reference(tmp_path):
    teacher = llama(seed=0)
    _spread(teacher, 40.0)
    student = QLORA.apply(quantized_student(tmp_path))
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
    student.train()
    loss_sum, counted = trainer.distill_loss_sum(student, batch)
    (loss_sum / counted).backward()
    adapters = {n: p for n, p in student.named_parameters() if p.requires_grad}
    fused = {n: p.grad.clone() for n, p in adapters.items()}
    student.zero_grad()
    # The reference: the same quantized model's own fp32 logits, the loss in float64. Both
    # run the same fp32 decoder; they differ by the fp32 rounding of the head GEMM and of the
    # loss (fastkd computes in fp32), so the tolerance is fp32's (2^-24 ~ 6e-8, times the
    # V = 97 term sums and the logit spread of ~30: well under 1e-4).
    reference = reference_loss(student, [teacher], batch, temperature=2.0, soft_weight=1.0,
                               hard_weight=0.3)
    reference.backward()
    assert rel_err((loss_sum / counted).double(), reference) < 1e-5
    assert any("lora_A" in n for n in adapters) and any("lora_B" in n for n in adapters)
    for name, p in adapters.items():
        assert fused[name].abs().max() > 0, name
        assert rel_err(fused[name], p.grad) < 1e-4, name


def test_qlora_needs_bitsandbytes_in_one_line_before_models_load(tmp_path, capsys,
                                                                 monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(SystemExit) as done:
        main(["distill", "--student", str(tmp_path / "nowhere"), "--teachers", "t",
              "--data", "d", "--config", str(_config(tmp_path, {"lora": {"qlora": True}}))])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora.qlora" in err and "fastkd[qlora]" in err


def test_qlora_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="lora.qlora must be true or false"):
        DistillConfig.from_dict({"student": "s", "teachers": ["t"], "lora": {"qlora": "yes"}})


def test_qlora_run_saves_adapters_resumes_and_merges_into_full_precision(tmp_path):
    values = tiny_run(tmp_path, {"lora": {"r": 4, "alpha": 8.0, "qlora": True},
                                 "merge_lora": True})
    llama(width=64, layers=1, seed=3).save_pretrained(tmp_path / "student")
    values.update(eval_steps=None, report_to=[], learning_rate=0.05)
    out = run_saves_adapters_and_resumes(tmp_path, values)
    # the merged export: the adapters added into the full-precision base (not NF4 weights)
    merged = check_merged_export(out, tmp_path / "student")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
