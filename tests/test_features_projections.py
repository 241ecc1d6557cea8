"""Learned projections: saved and restored, shape checks, not part of the student."""

import pytest
import torch

from fastkd.distill.features import FeatureAlignment, FeatureProjections, FeatureSettings
from fastkd.distill.features.projections import FILE_NAME
from tests.features_helpers import llama, qwen2

SETTINGS = FeatureSettings(hidden_weight=1.0, ffn_weight=1.0)


def test_save_and_restore(tmp_path):
    student, teacher = qwen2(), llama()
    torch.manual_seed(0)
    fa = FeatureAlignment(SETTINGS, student, [teacher])
    with torch.no_grad():
        for p in fa.projections.parameters():
            p.add_(1.0)  # trained
    path = fa.projections.save(tmp_path / "checkpoint-3")
    assert path.name == FILE_NAME and path.is_file()
    torch.manual_seed(1)
    fresh = FeatureAlignment(SETTINGS, student, [teacher])
    assert not torch.equal(fresh.projections.projections["teacher0_ffn_1_2"].weight,
                           fa.projections.projections["teacher0_ffn_1_2"].weight)
    fresh.projections.load(tmp_path / "checkpoint-3")
    for (name, a), (_, b) in zip(fa.projections.state_dict().items(),
                                 fresh.projections.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert len(fa.projections.state_dict()) == 4  # (hidden, ffn) x 2 pairs, bias-free
    assert not any("projection" in k for k in student.state_dict())


def test_restore_errors(tmp_path):
    student, teacher = qwen2(), llama()
    fa = FeatureAlignment(SETTINGS, student, [teacher])
    with pytest.raises(FileNotFoundError, match="no feature projections in"):
        fa.projections.load(tmp_path)
    FeatureProjections(16, [32], [((0, 1), (1, 2))], ["hidden", "ffn"]).save(tmp_path)
    with pytest.raises(ValueError, match="do not match this run's"):
        fa.projections.load(tmp_path)
    only_hidden = FeatureAlignment(FeatureSettings(hidden_weight=1.0), student, [teacher])
    only_hidden.projections.save(tmp_path)
    with pytest.raises(ValueError, match="different models, layer map or feature terms"):
        fa.projections.load(tmp_path)


def test_widths_must_match_pairs():
    with pytest.raises(ValueError, match="2 teacher widths for 1 pair lists"):
        FeatureProjections(16, [24, 32], [((0, 0),)], ["hidden"])
