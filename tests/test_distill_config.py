"""DistillConfig: YAML / JSON loading and the errors for keys, types and names."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd.distill import DistillConfig
from fastkd.distill.cli import build_parser


def test_yaml_and_json_give_the_same_config(tmp_path):
    values = {"student": "s", "teachers": ["a", "b"], "temperature": 2, "seq_len": 128,
              "teacher_priors": [1.0, 3.0], "training_args": {"gradient_checkpointing": True}}
    (tmp_path / "c.json").write_text(json.dumps(values))
    (tmp_path / "c.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()))
    from_json = DistillConfig.from_file(tmp_path / "c.json")
    assert from_json == DistillConfig.from_file(tmp_path / "c.yaml")
    assert from_json.temperature == 2 and from_json.teachers == ["a", "b"]
    assert not from_json.is_demo and DistillConfig().is_demo


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    (tmp_path / "c.yaml").write_text("temperatur: 2.0\n")
    with pytest.raises(ValueError, match=r"unknown config key 'temperatur'.*'temperature'"):
        DistillConfig.from_file(tmp_path / "c.yaml")


@pytest.mark.parametrize("values, error, match", [
    ({"divergence": "kld"}, ValueError, "unknown divergence 'kld'"),
    ({"weighting": "max"}, ValueError, "unknown weighting"),
    ({"fusion": "avg"}, ValueError, "unknown fusion"),
    ({"temperature": "hot"}, TypeError, "'temperature' expects"),
    ({"steps": 1.5}, TypeError, "'steps' expects"),
    ({"teachers": "t"}, TypeError, "'teachers' expects"),
    ({"temperature": 0}, ValueError, "temperature must be > 0"),
    ({"soft_weight": 0, "hard_weight": 0}, ValueError, "not both 0"),
    ({"divergence": "jsd", "beta": 1.5}, ValueError, "beta must be in"),
    ({"teachers": ["a"], "teacher_priors": [1.0, 2.0]}, ValueError, "2 entries for 1"),
    ({"seq_len": 1}, ValueError, "seq_len must be >= 2"),
    ({"teachers": ["a", "b"], "divergence": "jsd"}, ValueError, "'jsd' is for one teacher"),
    # refused by the optimizer or the loss after the models were loaded, before these checks
    ({"learning_rate": -1.0}, ValueError, "learning_rate must be >= 0"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps must be >= 0"),
    ({"teachers": ["a", "b"], "entropy_tau": 0.0}, ValueError, "entropy_tau must be > 0"),
    ({"teachers": ["a", "b"], "teacher_priors": [-1.0, 2.0]}, ValueError, "teacher_priors must be"),
    ({"learning_rate": "2e-5"}, TypeError, "a number given as a string"),
])
def test_bad_values_are_refused(values, error, match):
    with pytest.raises(error, match=match):
        DistillConfig.from_dict(values)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DistillConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ValueError, match="expected .yaml"):
        DistillConfig.from_file(tmp_path / "c.toml")
    (tmp_path / "c.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        DistillConfig.from_file(tmp_path / "c.yaml")


def test_repeated_list_flags_extend():
    args = vars(build_parser().parse_args(["distill", "--teachers", "a", "--teachers", "b", "c",
                                           "--teacher-priors", "1", "--teacher-priors", "2",
                                           "3"]))
    assert args["teachers"] == ["a", "b", "c"] and args["teacher_priors"] == [1.0, 2.0, 3.0]


def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 2\nteachers: [a, b\nseq_len: 16\n")
    with pytest.raises(ValueError) as info:
        DistillConfig.from_file(tmp_path / "c.yaml")
    message = str(info.value)
    assert "\n" not in message and "c.yaml" in message and "line 3" in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_json_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "c.json").write_text('{"steps": 2,\n "seq_len": }\n')
    with pytest.raises(ValueError, match=r"c\.json', line 2, column \d+: invalid JSON"):
        DistillConfig.from_file(tmp_path / "c.json")


def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads 2e-5 as a string; float fields take it as the number it spells
    (tmp_path / "c.yaml").write_text("learning_rate: 2e-5\nteachers: [a, b]\n"
                                     "teacher_priors: [1e0, 3]\ntemperature: 2\ntext_field: 1e3\n")
    cfg = DistillConfig.from_file(tmp_path / "c.yaml")
    assert cfg.learning_rate == 2e-5 and cfg.teacher_priors == [1.0, 3.0]
    assert cfg.text_field == "1e3"  # a string field keeps its string


def test_runtime_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="'.*file' is an existing file, not a folder"):
        DistillConfig(output_dir=str(tmp_path / "file")).check_runtime()
    with pytest.raises(ValueError, match="is a file, not a folder"):
        DistillConfig(output_dir=str(tmp_path / "file" / "run")).check_runtime()
    DistillConfig(output_dir=str(tmp_path / "new" / "run")).check_runtime()
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="backend 'triton' needs a CUDA device"):
            DistillConfig(backend="triton", output_dir=str(tmp_path)).check_runtime()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    DistillConfig(backend="triton", output_dir=str(tmp_path)).check_runtime()
    DistillConfig(backend="cpp", output_dir=str(tmp_path)).check_runtime()  # builds here


def test_help_shows_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["distill"].format_help()
    assert "(default: 512)" in text and "(default: kl)" in text and "(default: on)" in text
