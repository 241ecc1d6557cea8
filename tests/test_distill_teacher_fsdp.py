"""Teacher memory: with the teacher's decoder layers sharded by FSDP2 over 2 processes
(torchrun, gloo, CPU; `teacher_sharding: fsdp`), the trainer's loss and the student's gradients
equal those of 1 process with the whole teacher on the same global batch, while each process
holds half of each layer weight; `teacher_dtype` loads the teachers in the dtype asked for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastkd.distill import DistillConfig
from fastkd.distill.run import _teacher_dtype
from tests.ddp_launch import TORCHRUN, launch

WORKER = Path(__file__).with_name("distill_teacher_fsdp_worker.py")


def test_fsdp2_sharded_teacher_matches_one_process(tmp_path):
    sharded = launch(WORKER, tmp_path / "fsdp", TORCHRUN, 2)
    single = launch(WORKER, tmp_path / "single", [sys.executable], 4)
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    # each process keeps half of the (48, 24) up_proj weight of every teacher layer
    assert single["teacher_local_numel"] == single["teacher_numel"] == 48 * 24
    assert sharded["teacher_local_numel"] * 2 == sharded["teacher_numel"]
    assert not sharded["teacher_requires_grad"]
    # float32 both ways: the sharded teacher computes the same products (gathered weights), so
    # only the summation order over the 2 processes' rows differs (a few float32 ulps).
    torch.testing.assert_close(sharded["loss"], single["loss"], rtol=1e-5, atol=0)
    assert sharded["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("values, dtype", [
    ({"teacher_dtype": "bf16"}, torch.bfloat16),
    ({"teacher_dtype": "fp16"}, torch.float16),
    ({"teacher_dtype": "fp32", "bf16": True}, torch.float32),
    ({"bf16": True}, torch.bfloat16),
    ({}, None),
])
def test_teacher_dtype(values, dtype):
    cfg = DistillConfig.from_dict({"student": "s", "teachers": ["t"], **values})
    assert _teacher_dtype(cfg) == dtype


def test_bad_teacher_memory_settings_are_refused():
    with pytest.raises(ValueError, match="unknown teacher_dtype 'int8'"):
        DistillConfig.from_dict({"student": "s", "teachers": ["t"], "teacher_dtype": "int8"})
    with pytest.raises(ValueError, match="unknown teacher_sharding 'ddp'"):
        DistillConfig.from_dict({"student": "s", "teachers": ["t"], "teacher_sharding": "ddp"})


def test_torchrun_cli_with_sharded_teacher_lora_student_and_evaluation(tmp_path):
    """`fastkd distill --config` under torchrun (2 CPU processes): a LoRA student in DDP, the
    teacher sharded, evaluations and the best student; one log line per step (one run)."""
    import json
    import os
    import subprocess

    import yaml

    from tests.distill_helpers import llama, tokenizer, write_texts

    root = Path(__file__).resolve().parent.parent
    for name, model in (("teacher", llama(seed=0)), ("student", llama(width=16, layers=1,
                                                                        seed=3))):
        model.save_pretrained(tmp_path / name)
        tokenizer().save_pretrained(tmp_path / name)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(dict(
        student=str(tmp_path / "student"), teachers=[str(tmp_path / "teacher")],
        data=str(write_texts(tmp_path / "train.jsonl", 30)),
        eval_data=str(write_texts(tmp_path / "eval.jsonl", 6, seed=1)),
        output_dir=str(tmp_path / "run"), seq_len=16, batch_size=2, steps=2, save_steps=2,
        logging_steps=1, eval_steps=1, save_best=True, teacher_sharding="fsdp",
        lora={"r": 4, "alpha": 8}, learning_rate=0.01,
        training_args={"use_cpu": True})))  # accelerate's CPU DDP needs use_cpu
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([*TORCHRUN, "-m", "fastkd.distill", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert [x["step"] for x in lines if "eval_kd_loss" in x] == [1, 2]
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
