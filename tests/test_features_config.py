"""Feature-alignment settings in DistillConfig and the CLI: accepted, checked before any model
is loaded, unknown keys still refused."""

from __future__ import annotations

import pytest

from fastkd.distill import DistillConfig
from fastkd.distill.cli import build_parser, main
from fastkd.distill.features import FeatureSettings


def test_feature_keys_reach_the_settings():
    cfg = DistillConfig.from_dict({
        "hidden_weight": 1.0, "hidden_loss": "cosine", "attention_weight": 0.5,
        "attention_loss": "mse", "relation_heads": 4, "ffn_weight": 0.25,
        "ffn_loss": "mse", "layer_map": [[0, 1], [1, 3]], "weighting": "static",
    })
    assert FeatureSettings.from_config(cfg) == FeatureSettings(
        hidden_weight=1.0, hidden_loss="cosine", attention_weight=0.5, attention_loss="mse",
        relation_heads=4, ffn_weight=0.25, ffn_loss="mse", layer_map=((0, 1), (1, 3)),
        weighting="static")
    assert FeatureSettings.from_config(DistillConfig()).active == ()


def test_cli_flags():
    args = vars(build_parser().parse_args([
        "distill", "--hidden-weight", "0.5", "--attention-weight", "1", "--relation-heads", "4",
        "--ffn-weight", "2", "--layer-map", "0:1,1:3", "--hidden-loss", "cosine", "--ablation",
        "--ffn-loss", "mse",
    ]))
    args.pop("command"), args.pop("config")
    cfg = DistillConfig.from_dict(args)
    assert (cfg.hidden_weight, cfg.attention_weight, cfg.relation_heads, cfg.ffn_weight) == \
        (0.5, 1.0, 4, 2.0)
    assert cfg.layer_map == "0:1,1:3" and cfg.hidden_loss == "cosine" and cfg.ablation
    assert cfg.ffn_loss == "mse"


@pytest.mark.parametrize(("values", "error", "match"), [
    ({"hidden_wieght": 1.0}, ValueError, "unknown config key 'hidden_wieght' "
                                         r"\(did you mean 'hidden_weight'\?\)"),
    ({"ffn": 1.0}, ValueError, "unknown config key 'ffn'"),
    ({"hidden_weight": -1.0}, ValueError, "hidden_weight must be >= 0"),
    ({"hidden_loss": "l1"}, ValueError, "unknown hidden_loss 'l1'"),
    ({"ffn_loss": "l1"}, ValueError, "unknown ffn_loss 'l1'"),
    ({"attention_loss": "cosine"}, ValueError, "unknown attention_loss 'cosine'"),
    ({"relation_heads": 0}, ValueError, "relation_heads must be >= 1"),
    ({"relation_heads": 2.5}, TypeError, "config key 'relation_heads' expects"),
    ({"layer_map": "0-1"}, ValueError, "expected 'uniform' or 's:t,s:t"),
    ({"layer_map": [[0, 1, 2]]}, ValueError, "not a \\(student, teacher\\) pair"),
    ({"layer_map": [0, 1]}, TypeError, "config key 'layer_map' expects"),
    ({"ablation": True, "student": "s", "teachers": ["t"]}, ValueError,
     "ablation runs on the embedded demo"),
])
def test_bad_feature_settings(values, error, match):
    with pytest.raises(error, match=match):
        DistillConfig.from_dict(values)


def test_cli_reports_bad_feature_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--layer-map", "0:x"])
    assert exit_info.value.code == 2
    assert "layer_map '0:x'" in capsys.readouterr().err
