"""Models by name: hub ids resolved by `from_pretrained` from the local Hugging Face cache under
HF_HUB_OFFLINE=1, with revision, dtype (torch_dtype) and attn_implementation passed through."""

from __future__ import annotations

import json
import os
import re
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


def test_each_model_entry_sets_its_own_load_options():
    from fastkd.distill.run import _teacher_dtype

    cfg = DistillConfig.from_dict({
        "student": {"path": "s", "dtype": "float16", "revision": "r"},
        "teachers": ["a", {"path": "b", "revision": "v2", "attn_implementation": "eager",
                           "torch_dtype": "bfloat16"}],
        "dtype": "float32", "attn_implementation": "sdpa", "bf16": True})
    student, teachers = model_sources(cfg)
    assert student == ModelSource("s", "r", "float16", "sdpa")
    # an option the entry leaves out is the global one
    assert teachers == [ModelSource("a", None, "float32", "sdpa"),
                        ModelSource("b", "v2", "bfloat16", "eager")]
    # a teacher's own dtype wins over teacher_dtype / --bf16; the others get those
    entries = cfg.teacher_entries
    assert [_teacher_dtype(cfg, e) for e in entries] == [torch.bfloat16, None]
    assert _teacher_dtype(DistillConfig(**{**cfg.to_dict(), "teacher_dtype": "fp16"}),
                          entries[0]) == torch.float16


@pytest.mark.parametrize("values, message", [
    ({"teachers": [{"path": "t", "dtype": "fp8"}]},
     r"teachers\[0\]: unknown dtype 'fp8'; expected one of"),
    ({"teachers": ["t", {"path": "u", "revison": "main"}]},
     r"teachers\[1\]: unknown key 'revison' \(did you mean 'revision'\?\)"),
    ({"teachers": [{"revision": "main"}]}, r"teachers\[0\]: a model mapping needs path"),
    ({"student": {"path": "s", "dtype": 16}}, "student: dtype expects a string, got 16"),
    ({"student": {"path": "s", "revision": "a"}, "revision": "b"},
     "student sets its own revision and revision is given too"),
    ({"teachers": [{"path": "t", "revision": "a"}], "teacher_revisions": ["b"]},
     r"teachers\[0\] sets its own revision and teacher_revisions gives one too"),
    ({"teachers": [{"path": "t", "dtype": "float16", "torch_dtype": "float16"}]},
     r"teachers\[0\]: give dtype or torch_dtype"),
])
def test_bad_model_entries_are_one_line_errors_before_any_model_loads(
        values, message, tmp_path, capsys, monkeypatch):
    import fastkd.distill.run as run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run, "load_model", no_model)
    data = write_texts(tmp_path / "train.jsonl", 4)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"student": "s", "teachers": ["t"], "data": str(data),
                                  "output_dir": str(tmp_path / "run"), **values}))
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastkd distill: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_per_model_revision_and_dtype_reach_the_loaded_models(offline_hub, tmp_path):
    from fastkd.distill.run import prepare

    cfg = DistillConfig.from_dict({
        "student": {"path": STUDENT + "-v", "revision": "v2"},
        "teachers": [{"path": TEACHER, "dtype": "bfloat16", "attn_implementation": "eager"}],
        "dtype": "float32", "data": str(write_texts(tmp_path / "train.jsonl", 8)),
        "seq_len": 16, "steps": 1, "batch_size": 2, "output_dir": str(tmp_path / "run")})
    job = prepare(cfg)
    student, (teacher,) = job.trainer.model, job.trainer.teachers
    expected = llama(width=16, tied=True, layers=1, seed=5).model.embed_tokens.weight
    assert torch.equal(student.model.embed_tokens.weight, expected)  # the v2 branch
    assert student.dtype == torch.float32 and teacher.dtype == torch.bfloat16
    assert teacher.config._attn_implementation == "eager"
