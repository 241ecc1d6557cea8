"""Bad input raises a clear ValueError / TypeError naming the argument and the shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastkd._checks as checks
from fastkd import fused_kd_loss, kd_loss
from fastkd.nn import AttentionKDLoss, FusedKDLoss, KDLoss, MultiTeacherKDLoss

V, HS, HT, N = 20, 6, 10, 4


def good():
    return dict(
        student_hidden=torch.randn(N, HS, requires_grad=True),
        student_weight=torch.randn(V, HS),
        teacher_hidden=torch.randn(N, HT),
        teacher_weight=torch.randn(V, HT),
        labels=torch.randint(0, V, (N,)),
    )


def call(**changes):
    args = good()
    options = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return fused_kd_loss(**args, **options)


CASES = [
    (dict(teacher_weight=torch.randn(V + 1, HT)), ValueError, r"teacher_weight \(21, 10\) has vocab size 21 but student_weight \(20, 6\) has 20"),
    (dict(teacher_hidden=torch.randn(N + 1, HT)), ValueError, r"token counts must match"),
    (dict(student_hidden=torch.randn(N, HS + 1)), ValueError, r"student_hidden \(4, 7\).*expects 6"),
    (dict(teacher_hidden=torch.randn(N, 3)), ValueError, r"teacher_hidden \(4, 3\).*expects 10"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, r"labels shape \(5,\)"),
    (dict(labels=torch.zeros(N)), TypeError, r"labels must be an int64 or int32 tensor, got torch.float32"),
    (dict(labels=torch.zeros(N, dtype=torch.uint8)), TypeError, r"labels must be an int64 or int32 tensor, got torch.uint8"),
    (dict(labels=torch.zeros(N, dtype=torch.int16)), TypeError, r"labels must be an int64 or int32 tensor, got torch.int16"),
    (dict(labels=torch.zeros(N, dtype=torch.int8)), TypeError, r"labels must be an int64 or int32 tensor, got torch.int8"),
    (dict(labels=torch.tensor([0, 1, V, 2]), hard_weight=1.0), ValueError, r"\[0, 20\).*\[0, 20\]"),
    (dict(labels=torch.tensor([0, -5, 1, 2]), hard_weight=1.0), ValueError, r"\[-5, 2\]"),
    (dict(labels=None, hard_weight=1.0), ValueError, r"hard_weight=1.0 needs labels"),
    (dict(divergence="kld"), ValueError, r"divergence must be one of .*'kld'"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of .*'avg'"),
    (dict(backend="gpu"), ValueError, r"backend must be one of .*'cuda'"),
    (dict(backend="cuda"), ValueError, r"backend='cuda' needs CUDA tensors"),
    (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=float("nan")), ValueError, r"temperature"),
    (dict(divergence="jsd", beta=1.5), ValueError, r"beta must lie in \[0, 1\].*1.5"),
    (dict(divergence="jsd", beta=-0.1), ValueError, r"beta must lie in \[0, 1\]"),
    (dict(divergence="jsd", beta=float("nan")), ValueError, r"beta must lie in \[0, 1\]"),
    (dict(soft_weight=-1.0), ValueError, r"soft_weight must be a finite number >= 0"),
    (dict(hard_weight=-0.5), ValueError, r"hard_weight must be a finite number >= 0"),
    (dict(student_hidden=torch.ones(N, HS, dtype=torch.long)), TypeError, r"student_hidden must be a floating"),
    (dict(teacher_weight=[[1.0]]), TypeError, r"teacher_weight must be a torch.Tensor, got list"),
    (dict(student_weight=torch.randn(V, HS, 1)), ValueError, r"student_weight must have 2 dim"),
    (dict(student_hidden=torch.randn(N, HS, dtype=torch.float64)), TypeError, r"student_hidden dtype torch.float64 mixed with student_weight dtype torch.float32"),
    (dict(student_bias=torch.randn(V + 2)), ValueError, r"student_bias shape \(22,\) must be \(20,\)"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int"),
    (dict(chunk_size=True), TypeError, r"chunk_size must be an int, got bool"),
    (dict(chunk_size=4.0), TypeError, r"chunk_size must be an int, got float"),
    (dict(chunk_size="4"), TypeError, r"chunk_size must be an int, got str"),
    (dict(student_weight=torch.randn(V, HS, device="meta")), ValueError, r"student_weight is on meta"),
    (dict(temperature=torch.tensor(2.0)), TypeError, r"temperature must be a real number, got Tensor \(pass a Python number"),
    (dict(soft_weight="1"), TypeError, r"soft_weight must be a real number, got str"),
    (dict(ignore_index=True), TypeError, r"ignore_index must be an int, got bool"),
    (dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int, got float"),
    (dict(soft_weight=0.0, hard_weight=0.0), ValueError, r"soft_weight and hard_weight are both 0"),
    (dict(student_weight=torch.randn(0, HS), teacher_weight=torch.randn(0, HT)), ValueError, r"student_weight \(0, 6\) has an empty vocab"),
]


@pytest.mark.parametrize("changes,error,pattern", CASES)
def test_fused_kd_loss_rejects(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**changes)


def test_kd_loss_rejects_mismatched_logits():
    with pytest.raises(ValueError, match=r"\(3, 5\) and teacher_logits \(3, 6\)"):
        kd_loss(torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(TypeError, match="teacher_logits must be a floating"):
        kd_loss(torch.randn(3, 5), torch.ones(3, 5, dtype=torch.int32))


def test_kd_loss_rejects_an_empty_vocab():
    with pytest.raises(ValueError, match=r"student_logits \(3, 0\) has an empty vocab"):
        kd_loss(torch.randn(3, 0), torch.randn(3, 0))


def test_numpy_scalars_are_numbers():
    args = good()
    want = fused_kd_loss(**args, temperature=2.0, ignore_index=-1, divergence="jsd", beta=0.25)
    got = fused_kd_loss(**args, temperature=np.float32(2.0), ignore_index=np.int64(-1),
                        divergence="jsd", beta=np.float64(0.25), chunk_size=np.int64(3))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("module, options, pattern", [
    (FusedKDLoss, dict(temprature=2.0), r"FusedKDLoss: unknown option 'temprature' \(did you "
                                        r"mean 'temperature'\?\)"),
    (FusedKDLoss, dict(student_bias=None), r"unknown option 'student_bias'"),
    (KDLoss, dict(loss="kl"), r"KDLoss: unknown option 'loss'"),
    (MultiTeacherKDLoss, dict(divergence="kl"), r"MultiTeacherKDLoss: unknown option"),
    (AttentionKDLoss, dict(divergence="kl"), r"AttentionKDLoss: unknown option 'divergence'"),
])
def test_modules_reject_unknown_options_at_construction(module, options, pattern):
    with pytest.raises(TypeError, match=pattern):
        module(**options)


def test_triton_forced_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(checks, "triton_interpreted", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors.*TRITON_INTERPRET"):
        call(backend="triton")
