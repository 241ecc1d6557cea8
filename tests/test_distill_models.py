"""Models by name: hub ids resolved by `from_pretrained` from the local Hugging Face cache under
HF_HUB_OFFLINE=1, with revision, dtype (torch_dtype) and attn_implementation passed through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch

from fastkd.distill.cli import main
from fastkd.distill.config import DistillConfig
from fastkd.distill.models import ModelSource, load_model, resolvable
from fastkd.distill.run import model_sources
from tests.distill_helpers import llama, tokenizer, write_texts

ROOT = Path(__file__).resolve().parent.parent
STUDENT, TEACHER = "fastkd-tests/tiny-student", "fastkd-tests/tiny-teacher"


def cache_model(cache: Path, repo_id: str, model, revisions: dict[str, str]) -> None:
    """Save `model` (and the test tokenizer) into the hub cache layout that `from_pretrained`
    reads offline: models--org--name/snapshots/<commit>/ with refs/<branch> -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for ref, commit in revisions.items():
        snapshot = repo / "snapshots" / commit
        model.save_pretrained(snapshot)
        tokenizer().save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache_model(cache, STUDENT, llama(width=16, tied=True, layers=1, seed=3),
                {"main": "a" * 40})
    # the v2 branch of the student holds other weights
    cache_model(cache, STUDENT + "-v", llama(width=16, tied=True, layers=1, seed=5),
                {"v2": "c" * 40})
    cache_model(cache, TEACHER, llama(), {"main": "b" * 40})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    assert resolvable("org/name", "student") == "org/name"
    assert resolvable("gpt2", "student") == "gpt2"
    assert resolvable(str(tmp_path), "student") == str(tmp_path)
    for bad in (str(tmp_path / "missing"), "./missing", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolvable(bad, "student")


def test_a_hub_id_loads_offline_with_its_revision(offline_hub):
    main_weights = load_model(STUDENT, "student").model.embed_tokens.weight
    v2 = load_model(ModelSource(STUDENT + "-v", revision="v2"), "student")
    expected = llama(width=16, tied=True, layers=1, seed=5).model.embed_tokens.weight
    assert torch.equal(v2.model.embed_tokens.weight, expected)
    assert not torch.equal(main_weights, expected)
    with pytest.raises(ValueError, match="could not be loaded as a causal LM"):
        load_model(ModelSource(STUDENT + "-v", revision="main"), "student")


def test_dtype_and_attention_pass_through(offline_hub):
    model = load_model(ModelSource(STUDENT, dtype="bfloat16", attn_implementation="eager"),
                       "student")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_torch_dtype_is_another_name_for_dtype():
    cfg = DistillConfig.from_dict({"student": "s", "teachers": ["t"], "torch_dtype": "float16"})
    assert cfg.dtype == "float16"
    with pytest.raises(ValueError, match="not both"):
        DistillConfig.from_dict({"torch_dtype": "float16", "dtype": "float16"})
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        DistillConfig(dtype="fp8")
    with pytest.raises(ValueError, match="teacher_revisions has 1 entries for 2 teachers"):
        DistillConfig(student="s", teachers=["a", "b"], teacher_revisions=["main"])
    student, teachers = model_sources(DistillConfig(
        student="s", teachers=["a", "b"], revision="r", teacher_revisions=["x", "y"],
        dtype="bfloat16", attn_implementation="sdpa"))
    assert student == ModelSource("s", "r", "bfloat16", "sdpa")
    assert [t.revision for t in teachers] == ["x", "y"]
    assert teachers[0].model_kwargs() == {"revision": "x", "dtype": torch.bfloat16,
                                          "attn_implementation": "sdpa"}


def test_distill_by_hub_id_offline(offline_hub, tmp_path):
    """`fastkd distill` in a fresh process whose environment names the cache and sets
    HF_HUB_OFFLINE=1 (as a user would), on the example config with the tiny models' ids."""
    config = ROOT / "examples" / "distill_hub.yaml"
    cfg = DistillConfig.from_file(config)
    assert cfg.dtype is not None and cfg.attn_implementation is not None
    out = tmp_path / "run"
    data = write_texts(tmp_path / "train.jsonl", 12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline_hub),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "fastkd.distill", "--config", str(config), "--student", STUDENT,
         "--teachers", TEACHER, "--teacher-revisions", "main", "--revision", "main",
         "--dtype", "float32", "--data", str(data), "--seq-len", "16", "--batch-size", "2",
         "--steps", "2", "--logging-steps", "1", "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]


def test_an_unknown_hub_id_fails_in_one_line_before_any_model_loads(offline_hub, tmp_path,
                                                                     capsys, monkeypatch):
    import fastkd.distill.run as run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run, "load_model", no_model)
    data = write_texts(tmp_path / "train.jsonl", 4)
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--student", "fastkd-tests/absent", "--teachers", TEACHER,
              "--data", str(data), "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "student 'fastkd-tests/absent' has no readable model config" in err
    assert err.count("\n") == 1, err
