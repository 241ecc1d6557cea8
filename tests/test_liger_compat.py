"""fastkd.nn.FusedKDLoss with Liger-Kernel's arguments equals Liger-Kernel 0.8.5's
LigerFusedLinearJSDLoss (its torch chunked loss, run on CPU with compiled=False) on the same
inputs: loss and every student gradient, over beta (0: forward KL, 1: reverse KL),
temperature, the soft / hard weights and ignore_index."""

from __future__ import annotations

import pytest
import torch
from liger_kernel.chunked_loss import jsd_loss  # the dev extra installs it

from fastkd.nn import FusedKDLoss
from tests.helpers import linear_inputs, random_labels, rel_err, tolerance

N, HS, HT, VOCAB = 12, 16, 24, 53
# (beta, temperature, weight_hard_loss, weight_soft_loss, ignore_index, bias)
CASES = [
    (0.0, 1.0, 0.5, 0.5, -100, False),
    (1.0, 1.0, 0.5, 0.5, -100, True),
    (0.5, 1.0, 0.5, 0.5, -100, False),
    (0.5, 2.5, 0.0, 1.0, -100, True),
    (0.1, 0.7, 0.8, 0.2, 7, False),
    (0.9, 3.0, 0.3, 1.0, -1, True),
    (0.0, 2.0, 1.0, 0.25, 7, True),
    (1.0, 0.5, 0.0, 2.0, -100, False),
]


def inputs(seed, ignore_index, bias):
    gen = torch.Generator().manual_seed(seed)
    h, w, b = linear_inputs((N,), HS, VOCAB, 5.0, torch.float32, "cpu", gen, bias)
    h_t, w_t, b_t = linear_inputs((N,), HT, VOCAB, 7.0, torch.float32, "cpu", gen, bias)
    labels = random_labels((N,), VOCAB, gen, "cpu", ignore_fraction=0.3,
                           ignore_index=ignore_index)
    return (h, w, h_t, w_t, labels, b, b_t)


def run(module, student_input, student_weight, teacher_input, teacher_weight, labels,
        student_bias, teacher_bias):
    """Loss and the student gradients (input, weight, bias) of ``module`` on fresh leaves."""
    leaves = [None if t is None else t.clone().requires_grad_()
              for t in (student_input, student_weight, student_bias)]
    loss = module(leaves[0], leaves[1], teacher_input, teacher_weight, labels, leaves[2],
                  teacher_bias)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("beta,temperature,hard,soft,ignore_index,bias", CASES)
def test_equals_liger(beta, temperature, hard, soft, ignore_index, bias):
    liger_arguments = dict(weight_hard_loss=hard, weight_soft_loss=soft, beta=beta,
                           ignore_index=ignore_index, temperature=temperature, compiled=False,
                           chunk_size=4)
    batch = inputs(len(CASES) + int(100 * beta), ignore_index, bias)
    ours, our_grads = run(FusedKDLoss(**liger_arguments), *batch)
    theirs, their_grads = run(jsd_loss.LigerFusedLinearJSDLoss(**liger_arguments), *batch)
    assert rel_err(ours, theirs) < tolerance(torch.float32)
    for mine, ref in zip(our_grads, their_grads):
        assert (mine is None) == (ref is None)
        if mine is not None:
            assert rel_err(mine, ref) < tolerance(torch.float32)


def test_liger_keyword_call():
    """Called by Liger's keyword names (as TRL's GKD trainer calls Liger's loss)."""
    h, w, h_t, w_t, labels, b, b_t = inputs(1, -100, True)
    named = dict(student_input=h, student_weight=w, teacher_input=h_t, teacher_weight=w_t,
                 true_labels=labels, student_bias=b, teacher_bias=b_t)
    arguments = dict(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.2, temperature=2.0)
    ours = FusedKDLoss(**arguments)(**named)
    theirs = jsd_loss.LigerFusedLinearJSDLoss(**arguments, compiled=False)(**named)
    assert rel_err(ours, theirs) < tolerance(torch.float32)
    with pytest.raises(TypeError, match=r"'true_labels' \(Liger-Kernel's name\) and 'labels' "
                                        r"\(fastkd's\) are the same argument"):
        FusedKDLoss(**arguments)(**named, labels=labels)


def test_liger_defaults():
    """A Liger-only name brings Liger's defaults for the rest (JSD, beta 0.5, both weights
    0.5); FusedKDLoss without one keeps fastkd's (forward KL, soft term only)."""
    batch = inputs(0, -100, False)
    theirs, _ = run(jsd_loss.LigerFusedLinearJSDLoss(compiled=False), *batch)
    ours, _ = run(FusedKDLoss(compiled=False), *batch)
    assert rel_err(ours, theirs) < tolerance(torch.float32)
    only_soft, _ = run(FusedKDLoss(weight_soft_loss=1.0), *batch)
    liger_soft, _ = run(jsd_loss.LigerFusedLinearJSDLoss(weight_soft_loss=1.0, compiled=False),
                        *batch)
    assert rel_err(only_soft, liger_soft) < tolerance(torch.float32)
    fastkd_default, _ = run(FusedKDLoss(), *batch)
    assert rel_err(fastkd_default, theirs) > 0.01  # a different loss: the defaults differ
    assert FusedKDLoss(compiled=True).options == dict(divergence="jsd", hard_weight=0.5,
                                                      soft_weight=0.5)


@pytest.mark.parametrize("liger,fastkd", [("weight_hard_loss", "hard_weight"),
                                          ("weight_soft_loss", "soft_weight")])
def test_both_spellings_refused(liger, fastkd):
    with pytest.raises(TypeError, match=rf"'{liger}' \(Liger-Kernel's name\) and '{fastkd}' "
                                        r"\(fastkd's\) set the same option"):
        FusedKDLoss(**{liger: 0.5, fastkd: 0.5})


def test_liger_arguments_checked():
    with pytest.raises(TypeError, match=r"compiled must be a bool, got int"):
        FusedKDLoss(compiled=1)
    assert FusedKDLoss(return_soft_hard_loss=False, weight_hard_loss=0.1).options[
        "hard_weight"] == 0.1
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):  # fastkd's own checks
        FusedKDLoss(weight_hard_loss=0.5, beta=1.5)(*inputs(0, -100, False)[:5])


@pytest.mark.parametrize("beta,hard,soft", [(0.5, 0.5, 0.5), (0.0, 0.0, 1.0), (1.0, 2.0, 0.0)])
def test_return_soft_hard_loss_equals_liger(beta, hard, soft):
    """return_soft_hard_loss=True: (loss, soft, hard) as Liger's, the unweighted JSD and CE
    means, whatever the weights (a zero weight still gets its part)."""
    arguments = dict(weight_hard_loss=hard, weight_soft_loss=soft, beta=beta, temperature=1.5,
                     return_soft_hard_loss=True)
    h, w, h_t, w_t, labels, b, b_t = inputs(3, -100, True)
    ours = FusedKDLoss(**arguments)(h, w, h_t, w_t, labels, b, b_t)
    theirs = jsd_loss.LigerFusedLinearJSDLoss(**arguments, compiled=False)(
        h, w, h_t, w_t, labels, b, b_t)
    assert len(ours) == len(theirs) == 3
    for mine, ref in zip(ours, theirs):
        assert rel_err(mine, ref) < tolerance(torch.float32)
    assert ours[1] > 0 and ours[2] > 0
