"""DistillConfig: YAML / JSON loading and the errors for keys, types and names."""

from __future__ import annotations

import json

import pytest

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
    ({"divergence": "jsd", "beta": 1.0}, ValueError, "beta must be in"),
    ({"teachers": ["a"], "teacher_priors": [1.0, 2.0]}, ValueError, "2 entries for 1"),
    ({"seq_len": 1}, ValueError, "seq_len must be >= 2"),
    ({"teachers": ["a", "b"], "divergence": "jsd"}, ValueError, "'jsd' is for one teacher"),
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
