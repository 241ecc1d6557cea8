"""Mixed dtypes: hidden states, lm_head weight and bias of different floating dtypes (autocast,
fp32 master weights) on every backend, against the float64 oracle, and under torch.autocast.

The loss is computed in fp32 from the inputs' exact values, so it matches the oracle (fed the
same values in float64) to fp32's tolerance even where an input is bf16; each gradient is
rounded once to its input's dtype, so it matches to that dtype's tolerance.
"""

from __future__ import annotations

import pytest
import torch

import fastkd.matmul as matmul
from fastkd import csrc, fused_kd_loss, multi_teacher_kd_loss, sparse_kd_loss
from fastkd.nn import FusedKDLoss
from fastkd.reference import (
    fused_kd_loss_reference,
    multi_teacher_kd_loss_reference,
    sparse_kd_loss_reference,
)
from tests.helpers import NATIVE_BACKEND, random_labels, rel_err, tolerance

BACKENDS = ["torch", "triton", NATIVE_BACKEND]
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
LEADING, HS, HT, VOCAB, STD = (2, 5), 16, 12, 97, 4.0
# (hidden, weight, bias) dtypes of the student; None: no bias
MIXES = [
    (BF16, FP32, None),
    (BF16, FP32, BF16),
    (FP16, FP32, FP32),
    (FP32, BF16, None),
    (FP32, FP16, FP16),
    (BF16, FP16, FP32),  # three dtypes
    (BF16, BF16, FP32),  # only the bias differs
]
LOSS_TOLERANCE = tolerance(FP32)  # fp32 math on exact input values


@pytest.fixture(scope="module", autouse=True)
def native_ops_loaded():
    assert csrc.load(), "the C++ extension did not build (see the warning)"


def linear(gen, leading, hidden, dtypes, device):
    """hidden (*leading, hidden), weight (V, hidden), bias (V,) or None, in the given dtypes,
    with logits of std about STD."""
    hidden_dtype, weight_dtype, bias_dtype = dtypes
    h = torch.randn(*leading, hidden, generator=gen).to(device, hidden_dtype)
    w = (torch.randn(VOCAB, hidden, generator=gen) * STD / hidden**0.5).to(device, weight_dtype)
    b = None if bias_dtype is None else (
        torch.randn(VOCAB, generator=gen) * STD / 4).to(device, bias_dtype)
    return h, w, b


def leaves(*tensors, double=False):
    """Fresh leaves requiring grad (float64 copies of the same values for the oracle)."""
    return [None if t is None else (t.double() if double else t).detach().clone().requires_grad_()
            for t in tensors]


def assert_grads_match(ours, refs):
    """Each gradient in its input's dtype, within that dtype's tolerance of the oracle's, or
    half's where the student's hidden and weight are both half: their GEMMs then read
    d loss / d z rounded to half, which bounds a wider bias's gradient too."""
    hidden, weight = ours[0], ours[1]
    gemm_half = hidden.dtype == weight.dtype and weight.dtype in (BF16, FP16)
    for mine, ref in zip(ours, refs):
        if mine is None:
            continue
        assert mine.grad.dtype == mine.dtype
        bound = tolerance(weight.dtype if gemm_half else mine.dtype)
        assert rel_err(mine.grad, ref.grad) < bound, (mine.dtype, ref.shape)


@pytest.mark.parametrize("dtypes", MIXES, ids=lambda d: "-".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kd_loss_mixed(dtypes, backend, device):
    gen = torch.Generator().manual_seed(1)
    h, w, b = linear(gen, LEADING, HS, dtypes, device)
    # the teacher mixes the other way round: weight in the student hidden's dtype
    teacher_dtypes = (dtypes[1], dtypes[0], dtypes[2])
    h_t, w_t, b_t = linear(gen, LEADING, HT, teacher_dtypes, device)
    labels = random_labels(LEADING, VOCAB, gen, device)
    options = dict(divergence="jsd", beta=0.3, temperature=1.5, hard_weight=0.4)
    ours, refs = leaves(h, w, b), leaves(h, w, b, double=True)
    loss = fused_kd_loss(ours[0], ours[1], h_t, w_t, labels, student_bias=ours[2],
                         teacher_bias=b_t, backend=backend, chunk_size=4, **options)
    ref = fused_kd_loss_reference(refs[0], refs[1], h_t, w_t, labels, student_bias=refs[2],
                                  teacher_bias=b_t, **options)
    assert loss.dtype == FP32
    assert rel_err(loss, ref) < LOSS_TOLERANCE
    loss.backward()
    ref.backward()
    assert_grads_match(ours, refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_replays_mixed(backend, device):
    """The per-token loss's backward reruns the chunks with the mixed operands."""
    gen = torch.Generator().manual_seed(2)
    h, w, b = linear(gen, LEADING, HS, (BF16, FP32, FP16), device)
    h_t, w_t, _ = linear(gen, LEADING, HT, (FP32, BF16, None), device)
    labels = random_labels(LEADING, VOCAB, gen, device)
    token_weights = torch.rand(LEADING, generator=gen).to(device) + 0.5
    ours, refs = leaves(h, w, b), leaves(h, w, b, double=True)
    loss = fused_kd_loss(ours[0], ours[1], h_t, w_t, labels, student_bias=ours[2],
                         reduction="none", backend=backend, chunk_size=3)
    ref = fused_kd_loss_reference(refs[0], refs[1], h_t, w_t, labels, student_bias=refs[2],
                                  reduction="none")
    assert loss.shape == LEADING and rel_err(loss, ref) < LOSS_TOLERANCE
    (loss * token_weights).sum().backward()
    (ref * token_weights.double()).sum().backward()
    assert_grads_match(ours, refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_teacher_mixed(backend, device):
    gen = torch.Generator().manual_seed(3)
    h, w, b = linear(gen, LEADING, HS, (BF16, FP32, FP32), device)
    built = [linear(gen, LEADING, HT + 4 * k, dtypes, device)
             for k, dtypes in enumerate([(BF16, FP32, None), (FP32, FP16, FP16)])]
    h_t, w_t, b_t = ([t[i] for t in built] for i in range(3))
    labels = random_labels(LEADING, VOCAB, gen, device)
    options = dict(temperature=2.0, hard_weight=0.3)
    ours, refs = leaves(h, w, b), leaves(h, w, b, double=True)
    loss = multi_teacher_kd_loss(ours[0], ours[1], h_t, w_t, labels, student_bias=ours[2],
                                 teacher_biases=b_t, backend=backend, chunk_size=4, **options)
    ref = multi_teacher_kd_loss_reference(refs[0], refs[1], h_t, w_t, labels,
                                          student_bias=refs[2], teacher_biases=b_t, **options)
    assert rel_err(loss, ref) < LOSS_TOLERANCE
    loss.backward()
    ref.backward()
    assert_grads_match(ours, refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_mixed(backend, device):
    gen = torch.Generator().manual_seed(4)
    h, w, b = linear(gen, LEADING, HS, (FP32, BF16, BF16), device)
    z_t = torch.randn(*LEADING, VOCAB, generator=gen, dtype=FP64) * STD
    top = z_t.topk(7, dim=-1)
    ids, logits = top.indices.to(device), top.values.to(device, FP32)
    lse = torch.logsumexp(z_t / 1.5, dim=-1).to(device, FP32)
    labels = random_labels(LEADING, VOCAB, gen, device)
    options = dict(temperature=1.5, hard_weight=0.5)
    ours, refs = leaves(h, w, b), leaves(h, w, b, double=True)
    loss = sparse_kd_loss(ours[0], ours[1], ids, logits, lse, labels, student_bias=ours[2],
                          backend=backend, chunk_size=4, **options)
    ref = sparse_kd_loss_reference(refs[0], refs[1], ids, logits, lse, labels,
                                   student_bias=refs[2], **options)
    assert rel_err(loss, ref) < LOSS_TOLERANCE
    loss.backward()
    ref.backward()
    assert_grads_match(ours, refs)


@pytest.mark.parametrize("backend", ["torch", NATIVE_BACKEND])
def test_under_autocast(backend, device):
    """FusedKDLoss inside torch.autocast, end to end: a model whose Linear yields bf16 hidden
    states, its fp32 lm_head and fp32 teacher. The loss equals the oracle on the same hidden
    values to fp32's tolerance, so autocast recast none of the loss's own GEMMs to bf16 (bf16
    logits would miss it by about 2^-9), and each gradient comes back in its input's dtype."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*LEADING, HS, generator=gen).to(device)
    body = torch.nn.Linear(HS, HS).to(device)
    lm_head = (torch.randn(VOCAB, HS, generator=gen) * STD / HS**0.5).to(device)
    lm_head.requires_grad_()
    lm_bias = (torch.randn(VOCAB, generator=gen) * STD / 4).to(device).requires_grad_()
    h_t, w_t, _ = linear(gen, LEADING, HT, (FP32, FP32, None), device)
    labels = random_labels(LEADING, VOCAB, gen, device)
    loss_fn = FusedKDLoss(divergence="reverse_kl", temperature=2.0, hard_weight=0.5,
                          backend=backend, chunk_size=4)
    with torch.autocast(torch.device(device).type, dtype=BF16):
        hidden = body(x)
        hidden.retain_grad()
        assert hidden.dtype == BF16
        loss = loss_fn(hidden, lm_head, h_t, w_t, labels, lm_bias)
        # fp32 hidden states under autocast: still fp32 GEMMs, not recast to bf16
        fp32_hidden = hidden.detach().float().requires_grad_()
        fp32_loss = loss_fn(fp32_hidden, lm_head.detach(), h_t, w_t, labels, lm_bias.detach())
        loss.backward()  # inside the region: the backward is not recast either
    options = dict(divergence="reverse_kl", temperature=2.0, hard_weight=0.5)
    refs = leaves(hidden, lm_head, lm_bias, double=True)
    ref = fused_kd_loss_reference(refs[0], refs[1], h_t, w_t, labels, student_bias=refs[2],
                                  **options)
    assert loss.dtype == FP32 and rel_err(loss, ref) < LOSS_TOLERANCE
    assert rel_err(fp32_loss, ref) < LOSS_TOLERANCE
    ref.backward()
    assert hidden.grad.dtype == BF16 and lm_head.grad.dtype == FP32
    assert rel_err(hidden.grad, refs[0].grad) < tolerance(BF16)
    assert rel_err(lm_head.grad, refs[1].grad) < tolerance(FP32)
    assert lm_bias.grad.dtype == FP32 and rel_err(lm_bias.grad, refs[2].grad) < tolerance(FP32)
    assert body.weight.grad is not None and body.weight.grad.dtype == FP32


@pytest.mark.parametrize("columns_first", [True, False])
def test_mixed_mm_slabs(columns_first, monkeypatch):
    """The promoted weight slabs (along columns for a wide b, along rows for a tall one) add up
    to the product of the promoted operands, with out's rounding only."""
    gen = torch.Generator().manual_seed(6)
    shape = (6, 50) if columns_first else (50, 6)
    a = torch.randn(7, shape[0], generator=gen).to(BF16)
    b = torch.randn(*shape, generator=gen)
    monkeypatch.setattr(matmul, "SLAB_ELEMENTS", 64)  # several slabs, a ragged last one
    exact = a.double() @ b.double()
    for out_dtype in (FP32, BF16):
        out = torch.full((7, shape[1]), float("nan"), dtype=out_dtype)
        matmul.mm(a.float(), b.to(BF16), out=out)  # fp32 rows against a bf16 weight
        reference = a.double() @ b.to(BF16).double()
        assert rel_err(out, reference) < tolerance(out_dtype)
        matmul.mm(a, b, out=out)  # bf16 rows against an fp32 weight
        assert rel_err(out, exact) < tolerance(out_dtype)


BAD = [
    # (hidden, weight, bias) dtypes, the error and its message
    ((FP64, FP32, None), TypeError,
     r"student_hidden dtype torch.float64 mixed with student_weight dtype torch.float32"),
    ((BF16, FP64, None), TypeError,
     r"student_hidden dtype torch.bfloat16 mixed with student_weight dtype torch.float64"),
    ((FP32, FP32, FP64), TypeError,
     r"student_bias dtype torch.float64 mixed with student_weight dtype torch.float32"),
    ((FP64, FP64, FP32), TypeError,
     r"student_bias dtype torch.float32 mixed with student_weight dtype torch.float64"),
    ((FP32, FP32, torch.int64), TypeError, r"student_bias must be a floating tensor"),
    ((FP32, torch.int32, None), TypeError, r"student_weight must be a floating tensor"),
    ((torch.int64, FP32, None), TypeError, r"student_hidden must be a floating tensor"),
]


@pytest.mark.parametrize("dtypes,error,pattern", BAD)
def test_fp64_and_integers_refused(dtypes, error, pattern):
    """fp64 (the gradcheck / oracle dtype) mixes with nothing; integer tensors are refused."""
    hidden_dtype, weight_dtype, bias_dtype = dtypes
    h = torch.ones(*LEADING, HS, dtype=hidden_dtype)
    w = torch.ones(VOCAB, HS, dtype=weight_dtype)
    b = None if bias_dtype is None else torch.ones(VOCAB, dtype=bias_dtype)
    h_t, w_t = torch.randn(*LEADING, HT), torch.randn(VOCAB, HT)
    with pytest.raises(error, match=pattern):
        fused_kd_loss(h, w, h_t, w_t, student_bias=b)


def test_teacher_fp64_mixing_refused():
    """Each teacher's lm_head follows the same rule, named by its argument."""
    h, w = torch.randn(*LEADING, HS), torch.randn(VOCAB, HS)
    h_t, w_t = torch.randn(*LEADING, HT, dtype=FP64), torch.randn(VOCAB, HT, dtype=BF16)
    with pytest.raises(TypeError, match=r"teacher_hidden dtype torch.float64 mixed with "
                                        r"teacher_weight dtype torch.bfloat16"):
        fused_kd_loss(h, w, h_t, w_t)
    with pytest.raises(TypeError, match=r"teacher_hiddens\[1\] dtype torch.float64 mixed with "
                                        r"teacher_weights\[1\] dtype torch.bfloat16"):
        multi_teacher_kd_loss(h, w, [h_t.float(), h_t], [w_t, w_t])


def test_fp64_teacher_mixes_with_fp32_student():
    """A teacher's dtypes are its own: an all-fp64 teacher under an fp32 student is fine."""
    gen = torch.Generator().manual_seed(7)
    h, w, _ = linear(gen, LEADING, HS, (FP32, FP32, None), "cpu")
    h_t, w_t, _ = linear(gen, LEADING, HT, (FP64, FP64, None), "cpu")
    loss = fused_kd_loss(h, w, h_t, w_t, backend="torch")
    assert loss.dtype == FP32
    assert rel_err(loss, fused_kd_loss_reference(h, w, h_t, w_t)) < LOSS_TOLERANCE


def test_trainer_bf16_mixed_precision(tmp_path, monkeypatch):
    """The trainer with bf16 training arguments on CPU (accelerate's autocast) and a bf16
    teacher under the fp32 student: every fused_kd_loss call it makes equals the float64
    oracle on the very tensors it was given, to fp32's tolerance. (The trainer turns autocast
    off around the loss itself, fastkd/distill/capture.py, and these models' final hidden
    states stay fp32 under autocast, so its student lm_head is not mixed; the teacher's
    dtype differs from the student's.)"""
    import fastkd.distill.loss as distill_loss
    from fastkd.distill import DistillationTrainer, LogitKD
    from fastkd.distill.data import CausalCollator
    from tests.distill_helpers import args, llama, qwen2, rows

    calls = []

    def recording(*arguments, **options):
        out = fused_kd_loss(*arguments, **options)
        loss = out[0] if options.get("return_parts") else out  # logging steps: (loss, parts)
        calls.append(([a.detach().clone() for a in arguments], options, loss.detach()))
        return out

    monkeypatch.setattr(distill_loss, "fused_kd_loss", recording)
    trainer = DistillationTrainer(
        model=qwen2(), args=args(tmp_path, max_steps=2, bf16=True, use_cpu=True),
        teachers=[llama().bfloat16()], kd=LogitKD(hard_weight=0.5, temperature=2.0),
        train_dataset=rows(4), data_collator=CausalCollator(0))
    trainer.train()
    assert len(calls) >= 2
    keep = ("student_bias", "teacher_bias", "divergence", "beta", "temperature", "soft_weight",
            "hard_weight", "ignore_index", "reduction")
    for (h, w, h_t, w_t, labels), options, loss in calls:
        assert (h.dtype, w.dtype, h_t.dtype, w_t.dtype) == (FP32, FP32, BF16, BF16)
        ref = fused_kd_loss_reference(h, w, h_t, w_t, labels,
                                      **{k: v for k, v in options.items() if k in keep})
        assert rel_err(loss, ref) < LOSS_TOLERANCE
