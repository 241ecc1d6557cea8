"""The divergences tvd, skew_kl and skew_reverse_kl against the float64 oracle, on every backend.

Loss and every student gradient (fused_kd_loss and kd_loss), alpha's range and its alpha = 1
limit, saturated rows, and the argument checks. docs/design.md derives the math.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastkd import fused_kd_loss, kd_loss, sparse_kd_loss
from fastkd.distill.cli import build_parser
from fastkd.distill.config import DistillConfig
from fastkd.distill.loss import LogitKD
from fastkd.functional import _kd_options
from fastkd.nn import FusedKDLoss, KDLoss
from fastkd.reference import kd_loss_reference
from tests.helpers import NATIVE_BACKEND, linear_inputs, random_labels, rel_err, tolerance
from tests.test_fused_kd_loss import run_both

NEW = ["tvd", "skew_kl", "skew_reverse_kl"]
SKEW = ["skew_kl", "skew_reverse_kl"]
BACKENDS = ["torch", "triton", NATIVE_BACKEND]


def kd_both(student, teacher, labels=None, **options):
    """kd_loss and the oracle on the same logits (*, V): (loss, ref, grad, ref_grad)."""
    ours = student.clone().requires_grad_()
    ref_in = student.detach().double().requires_grad_()
    loss = kd_loss(ours, teacher, labels, **options)
    ref = kd_loss_reference(ref_in, teacher.double(), labels,
                            **{k: v for k, v in options.items() if k != "backend"})
    loss.sum().backward()
    ref.sum().backward()
    return loss, ref, ours.grad, ref_in.grad


def logits(shape, std, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)


GRID = list(itertools.product(NEW, [1.0, 2.5], [torch.float32, torch.bfloat16], BACKENDS))
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("divergence,temperature,dtype,backend", GRID)
def test_fused_matches_oracle(divergence, temperature, dtype, backend, device):
    """Hidden states to loss: labels with ignored tokens and a hard CE term, a prime vocab.
    Each divergence and backend meets every reduction, logit spread (3, 10, 30) and alpha
    (0.1, 0.5, 0.9; read by the skew divergences) over its four (T, dtype) cases."""
    case = GRID.index((divergence, temperature, dtype, backend))
    turn = case // len(BACKENDS)  # counts the (divergence, T, dtype) cases
    loss, ref, ours, refs = run_both(
        (2, 3), 16, 24, 131, dtype, device, case, bias=turn % 2 == 0, divergence=divergence,
        alpha=[0.1, 0.5, 0.9][(turn + case) % 3], temperature=temperature, soft_weight=0.7,
        hard_weight=0.4, reduction=REDUCTIONS[turn % 3], backend=backend, chunk_size=4,
        logit_std=[3.0, 10.0, 30.0][(turn + 1) % 3],
    )
    tol = tolerance(dtype)
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) < tol
    for mine, theirs in zip(ours, refs, strict=True):
        assert mine.grad.dtype == mine.dtype
        assert rel_err(mine.grad, theirs.grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9, 1.0])
def test_kd_loss_over_alpha(divergence, alpha, backend, device):
    """kd_loss with labels (a quarter ignored) and a hard term, T = 2.5, V = 257 (prime)."""
    z, zt = logits((6, 257), 8.0, 1, device=device), logits((6, 257), 8.0, 2, device=device)
    labels = random_labels((6,), 257, torch.Generator().manual_seed(3), device)
    loss, ref, grad, ref_grad = kd_both(z, zt, labels, divergence=divergence, alpha=alpha,
                                        temperature=2.5, hard_weight=0.3, reduction="none",
                                        backend=backend)
    assert rel_err(loss, ref) < 1e-4
    assert rel_err(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
@pytest.mark.parametrize("logit_std", [3.0, 10.0, 30.0])
def test_saturated_distributions(divergence, logit_std, backend, device):
    """Near one-hot teacher and student with different modes (std 30 at T = 1; V = 1031): the
    top-logit rewrite, tvd's centering by masses and skew_reverse_kl's phi keep the fp32
    gradient accurate where q (h - E_q[h]) would cancel. (At std 100 the exact gradient is
    below the fp32 range: 1e-40 and less.)"""
    loss, ref, ours, refs = run_both((5,), 16, 16, 1031, torch.float32, device, 11, bias=False,
                                     divergence=divergence, alpha=0.5, logit_std=logit_std,
                                     backend=backend)
    assert rel_err(loss, ref) < 1e-4
    for mine, theirs in zip(ours, refs, strict=True):
        assert rel_err(mine.grad, theirs.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
def test_single_token_and_prime_vocab_across_blocks(divergence, backend, device):
    """N = 1 and V = 2053 (past a 2,048 block: the Triton and C++ loops run twice)."""
    loss, ref, ours, refs = run_both((1,), 8, 12, 2053, torch.float32, device, 3, bias=True,
                                     divergence=divergence, alpha=0.3, hard_weight=1.0,
                                     backend=backend)
    assert rel_err(loss, ref) < 1e-4
    for mine, theirs in zip(ours, refs, strict=True):
        assert rel_err(mine.grad, theirs.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,plain", [("skew_kl", "kl"),
                                              ("skew_reverse_kl", "reverse_kl")])
def test_alpha_one_is_the_plain_divergence(divergence, plain, backend, device):
    """alpha = 1 runs plain KL / reverse KL's own code path (the same numbers); the skew kernels
    at alpha = 1 - 1e-6 approach them: the difference is (1 - alpha) times a chi-square
    divergence of p and q, about 1e-6 relative for a teacher near the student (log-ratios of
    std 0.5), so within 1e-5."""
    assert _kd_options(divergence, 0.5, 1.0, 1.0, 0.0, -100, 1.0).divergence == plain
    z = logits((4, 211), 3.0, 5, device=device)
    zt = z + logits((4, 211), 0.5, 6, device=device)
    results = {}
    for name, alpha in ((plain, 0.9), (divergence, 1.0), (divergence, 1 - 1e-6)):
        x = z.clone().requires_grad_()
        loss = kd_loss(x, zt, divergence=name, alpha=alpha, reduction="none", backend=backend)
        loss.sum().backward()
        results[name, alpha] = loss.detach(), x.grad
    plain_loss, plain_grad = results[plain, 0.9]
    assert torch.equal(results[divergence, 1.0][0], plain_loss)
    assert torch.equal(results[divergence, 1.0][1], plain_grad)
    near_loss, near_grad = results[divergence, 1 - 1e-6]
    assert rel_err(near_loss, plain_loss) < 1e-5
    assert rel_err(near_grad, plain_grad) < 1e-5
    # and the skew kernel is the skew divergence there, not the plain one by accident
    _, ref_loss, _, ref_grad = kd_both(z, zt, divergence=divergence, alpha=1 - 1e-6,
                                       reduction="none", backend=backend)
    assert rel_err(near_loss, ref_loss) < 1e-5
    assert rel_err(near_grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_tvd_of_a_distribution_with_itself_is_zero(backend, device):
    """Teacher == student: every |p_j - q_j| = 0 and the subgradient sign(0) = 0, so loss 0 and
    gradient 0 exactly (also through the fused GEMMs, which compute the same logits)."""
    z = logits((5, 97), 10.0, 7, device=device)
    loss, _, grad, _ = kd_both(z, z.clone(), divergence="tvd", temperature=2.0, backend=backend,
                               reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    gen = torch.Generator().manual_seed(8)
    h, w, _ = linear_inputs((6,), 8, 97, 10.0, torch.float32, device, gen)
    h_s, w_s = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused = fused_kd_loss(h_s, w_s, h, w, divergence="tvd", backend=backend, chunk_size=4)
    fused.backward()
    assert fused.item() == 0
    assert torch.equal(h_s.grad, torch.zeros_like(h)) and torch.equal(w_s.grad,
                                                                       torch.zeros_like(w))


def test_tvd_is_one_minus_the_acceptance_rate(device):
    """Speculative decoding accepts a draft token from q with probability
    sum_j min(p_j, q_j) = 1 - TVD(p, q)."""
    z, zt = logits((3, 50), 4.0, 9, device=device), logits((3, 50), 4.0, 10, device=device)
    tvd = kd_loss(z, zt, divergence="tvd", reduction="none", backend="torch")
    acceptance = torch.minimum(z.softmax(-1), zt.softmax(-1)).sum(-1)
    torch.testing.assert_close(tvd, 1 - acceptance)


@pytest.mark.parametrize("loss_fn", ["fused_kd_loss", "kd_loss"])
def test_bad_alpha_is_refused(loss_fn):
    gen = torch.Generator().manual_seed(12)
    h, w, _ = linear_inputs((3,), 4, 11, 2.0, torch.float32, "cpu", gen)
    z = h @ w.T

    def call(**options):
        if loss_fn == "kd_loss":
            return kd_loss(z, z, **options)
        return fused_kd_loss(h, w, h, w, **options)

    for divergence in ("skew_kl", "skew_reverse_kl", "kl"):
        for alpha in (0.0, -0.5, 1.5, math.nan, math.inf):
            with pytest.raises(ValueError, match="alpha"):
                call(divergence=divergence, alpha=alpha)
        for alpha in ("0.5", True, torch.tensor(0.5), None):
            with pytest.raises(TypeError, match="alpha"):
                call(divergence=divergence, alpha=alpha)
    with pytest.raises(ValueError, match="divergence"):
        call(divergence="tv")
    assert torch.isfinite(call(divergence="skew_kl", alpha=1e-3))  # any alpha in (0, 1]


def test_sparse_kd_loss_refuses_the_new_divergences():
    """A top-k teacher supports kl and reverse_kl only (docs/sparse.md)."""
    gen = torch.Generator().manual_seed(13)
    h, w, _ = linear_inputs((4,), 8, 40, 3.0, torch.float32, "cpu", gen)
    z_t = torch.randn(4, 40, generator=gen)
    values, ids = z_t.topk(5, dim=-1)
    for divergence in NEW:
        with pytest.raises(ValueError, match="divergence must be one of"):
            sparse_kd_loss(h, w, ids, values, z_t.logsumexp(-1), divergence=divergence)


def test_modules_and_trainer_config_take_alpha():
    """KDLoss / FusedKDLoss pass alpha on; the trainer's config checks it and carries it to
    LogitKD."""
    z, zt = logits((4, 33), 5.0, 14), logits((4, 33), 5.0, 15)
    module = KDLoss(divergence="skew_reverse_kl", alpha=0.4, backend="torch")
    torch.testing.assert_close(module(z, zt), kd_loss(z, zt, divergence="skew_reverse_kl",
                                                      alpha=0.4, backend="torch"))
    assert "alpha=0.4" in repr(module)
    assert FusedKDLoss(divergence="tvd").options == {"divergence": "tvd"}
    config = DistillConfig(divergence="skew_kl", alpha=0.7)
    assert LogitKD.from_config(config).alpha == 0.7
    assert DistillConfig().alpha == 0.9
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            DistillConfig(divergence="skew_kl", alpha=bad)
    with pytest.raises(TypeError, match="alpha"):
        DistillConfig(alpha="0.5")
    args = vars(build_parser().parse_args(["distill", "--divergence", "tvd", "--alpha", "0.3"]))
    assert args["divergence"] == "tvd" and args["alpha"] == 0.3
