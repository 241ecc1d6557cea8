"""sparse_kd_loss against the float64 oracle: loss and every student gradient, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastkd import csrc, fused_kd_loss, sparse_kd_loss
from fastkd.ops import row_op, sparse_kd_arguments
from fastkd.options import KDOptions
from fastkd.reference import sparse_kd_loss_reference
from tests.helpers import NATIVE_BACKEND, linear_inputs, random_labels, rel_err, tolerance

BACKENDS = ["torch", "triton", NATIVE_BACKEND]
VOCAB = 389  # prime: no multiple of any block size


@pytest.fixture(scope="module", autouse=True)
def native_ops_loaded():
    assert csrc.load(), "the C++ extension did not build (see the warning)"


def sparse_teacher(leading, vocab, k, temperature, std, gen, *, dtype=torch.float32,
                   lse_dtype=torch.float32, device="cpu"):
    """Top-k ids, their raw logits and the full tempered LSE of a random teacher (N, V)."""
    z_t = torch.randn(*leading, vocab, generator=gen, dtype=torch.float64) * std
    top = z_t.topk(k, dim=-1)
    # shuffle the k entries: the loss must not rely on sorted ids
    order = torch.rand(*leading, k, generator=gen).argsort(dim=-1)
    ids, logits = top.indices.gather(-1, order), top.values.gather(-1, order)
    lse = torch.logsumexp(z_t / temperature, dim=-1)
    return (z_t.to(device), ids.to(device), logits.to(device, dtype),
            lse.to(device, lse_dtype))


def run_both(leading, hidden, vocab, k, dtype, device, seed, *, bias=True, labels=True,
             std=8.0, chunk_size=3, teacher_dtype=torch.float32, **options):
    """Loss and student gradients from sparse_kd_loss and from the oracle, same inputs."""
    gen = torch.Generator().manual_seed(seed)
    h, w, b = linear_inputs(leading, hidden, vocab, std, dtype, device, gen, bias)
    _, ids, logits, lse = sparse_teacher(leading, vocab, k, options.get("temperature", 1.0), std,
                                         gen, dtype=teacher_dtype, device=device)
    y = random_labels(leading, vocab, gen, device) if labels else None
    reduction = options.get("reduction", "mean")
    token_weights = torch.rand(leading, generator=gen).to(device) + 0.5  # per-token backward for "none"

    def total(loss):
        return (loss * token_weights.to(loss.dtype)).sum() if reduction == "none" else loss

    students = [t for t in (h, w, b) if t is not None]
    ours = [t.clone().requires_grad_() for t in students]
    refs = [t.clone().double().requires_grad_() for t in students]
    loss = sparse_kd_loss(ours[0], ours[1], ids, logits, lse, y,
                          student_bias=ours[2] if bias else None, chunk_size=chunk_size,
                          **options)
    ref = sparse_kd_loss_reference(refs[0], refs[1], ids, logits, lse, y,
                                   student_bias=refs[2] if bias else None,
                                   **{key: v for key, v in options.items() if key != "backend"})
    total(loss).backward()
    total(ref).backward()
    return loss, ref, ours, refs


def assert_close(loss, ref, ours, refs, tol):
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) < tol
    for mine, theirs in zip(ours, refs):
        assert mine.grad.dtype == mine.dtype
        assert rel_err(mine.grad, theirs.grad) < tol


GRID = list(itertools.product([1, 8, 64, VOCAB], ["kl", "reverse_kl"], ["bucket", "renormalize"],
                              [1.0, 2.5], BACKENDS))


@pytest.mark.parametrize("k,divergence,tail,temperature,backend", GRID)
def test_matches_oracle(k, divergence, tail, temperature, backend, device):
    """fp32 inside: 1e-4 (docs/design.md section 5; the oracle is float64, the row math fp32
    over V = 389 terms and the teacher's p_tail in float64)."""
    seed = hash((k, divergence, tail, temperature, backend)) % 2**31
    std = [3.0, 10.0, 30.0][seed % 3]
    loss, ref, ours, refs = run_both((2, 5), 16, VOCAB, k, torch.float32, device, seed, std=std,
                                     divergence=divergence, tail=tail, temperature=temperature,
                                     soft_weight=0.7, hard_weight=0.4, backend=backend)
    assert_close(loss, ref, ours, refs, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_reductions(reduction, dtype, backend, device):
    loss, ref, ours, refs = run_both((11,), 16, VOCAB, 8, dtype, device, 7, reduction=reduction,
                                     temperature=2.0, hard_weight=0.5, backend=backend,
                                     teacher_dtype=torch.bfloat16)
    assert_close(loss, ref, ours, refs, tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_all_ids_bucket_equals_fused_kd_loss(divergence, temperature, backend, device):
    """k = V: the tail is empty and tail="bucket" is the dense loss."""
    gen = torch.Generator().manual_seed(5)
    leading, vocab = (7,), 97
    h_s, w_s, b_s = linear_inputs(leading, 12, vocab, 8.0, torch.float32, device, gen, True)
    h_t, w_t, _ = linear_inputs(leading, 20, vocab, 8.0, torch.float32, device, gen)
    z_t = h_t.double() @ w_t.double().T
    ids = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(7)]).to(device)
    lse = torch.logsumexp(z_t / temperature, dim=-1).float()
    labels = random_labels(leading, vocab, gen, device)
    grads = []
    for dense in (True, False):
        student = [t.clone().requires_grad_() for t in (h_s, w_s, b_s)]
        common = dict(student_bias=student[2], divergence=divergence, temperature=temperature,
                      hard_weight=0.3, backend=backend)
        if dense:
            loss = fused_kd_loss(student[0], student[1], h_t, w_t, labels, **common)
        else:
            logits = (h_t @ w_t.T).gather(1, ids)  # the fp32 logits fused_kd_loss sees
            loss = sparse_kd_loss(student[0], student[1], ids, logits, lse, labels, **common)
        loss.backward()
        grads.append((loss, *(t.grad for t in student)))
    for dense, sparse in zip(*grads):
        assert rel_err(sparse, dense) < 1e-5  # both fp32 over 97 terms; lse rounded to fp32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_padded_entries(divergence, tail, backend, device):
    """-inf teacher logits are padded entries with p = 0: finite, and as the oracle says."""
    gen = torch.Generator().manual_seed(3)
    leading, vocab, k = (9,), 61, 8
    h, w, _ = linear_inputs(leading, 12, vocab, 6.0, torch.float32, device, gen)
    _, ids, logits, lse = sparse_teacher(leading, vocab, k, 1.5, 6.0, gen, device=device)
    logits[:, -3:] = -math.inf
    logits[0, 1:] = -math.inf  # one real entry left
    ours = [t.clone().requires_grad_() for t in (h, w)]
    refs = [t.clone().double().requires_grad_() for t in (h, w)]
    loss = sparse_kd_loss(*ours, ids, logits, lse, divergence=divergence, tail=tail,
                          temperature=1.5, backend=backend)
    ref = sparse_kd_loss_reference(*refs, ids, logits, lse, divergence=divergence, tail=tail,
                                   temperature=1.5)
    loss.backward()
    ref.backward()
    assert torch.isfinite(loss)
    assert_close(loss, ref, ours, refs, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(reduction, backend, device):
    """No counted token: loss 0 (never NaN) and zero gradients, even with garbage teachers."""
    gen = torch.Generator().manual_seed(0)
    h, w, _ = linear_inputs((6,), 8, 50, 5.0, torch.float32, device, gen)
    _, ids, logits, lse = sparse_teacher((6,), 50, 4, 1.0, 5.0, gen, device=device)
    logits[2] = -math.inf  # an all-padded row at an ignored token
    h.requires_grad_()
    w.requires_grad_()
    labels = torch.full((6,), -100, device=device)
    loss = sparse_kd_loss(h, w, ids, logits, lse, labels, hard_weight=1.0, reduction=reduction,
                          tail="renormalize", backend=backend)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_and_leading_shape(backend, device):
    """(B, T) leading shape, N not divisible by the chunk: same as one chunk."""
    gen = torch.Generator().manual_seed(8)
    h, w, _ = linear_inputs((3, 7), 8, 83, 6.0, torch.float32, device, gen)
    _, ids, logits, lse = sparse_teacher((3, 7), 83, 5, 1.0, 6.0, gen, device=device)
    outs = [sparse_kd_loss(h, w, ids, logits, lse, reduction="none", chunk_size=c,
                           backend=backend) for c in (4, 21)]
    assert outs[0].shape == (3, 7)
    assert rel_err(outs[0], outs[1]) < 1e-6  # the same fp32 row math, other chunk bounds


def _inputs(vocab=40, k=4, leading=(5,)):
    gen = torch.Generator().manual_seed(1)
    h, w, _ = linear_inputs(leading, 8, vocab, 5.0, torch.float32, "cpu", gen)
    _, ids, logits, lse = sparse_teacher(leading, vocab, k, 1.0, 5.0, gen)
    return h, w, ids, logits, lse


def test_refuses_duplicate_ids():
    h, w, ids, logits, lse = _inputs()
    ids[3, 2] = ids[3, 0]
    with pytest.raises(ValueError, match=r"teacher_ids \(5, 4\) repeats an id .* token 3 "):
        sparse_kd_loss(h, w, ids, logits, lse)


@pytest.mark.parametrize("bad", [-1, 40])
def test_refuses_out_of_range_ids(bad):
    h, w, ids, logits, lse = _inputs()
    ids[1, 1] = bad
    with pytest.raises(ValueError, match=rf"outside \[0, 40\).* token 1 .*{bad}"):
        sparse_kd_loss(h, w, ids, logits, lse)


def test_refuses_non_integer_ids():
    h, w, ids, logits, lse = _inputs()
    with pytest.raises(TypeError, match="teacher_ids must be int64 or int32"):
        sparse_kd_loss(h, w, ids.float(), logits, lse)


@pytest.mark.parametrize("name,shape", [("teacher_ids", (5, 3)), ("teacher_logits", (5, 3)),
                                        ("teacher_lse", (4,)), ("teacher_ids", (4, 4))])
def test_refuses_disagreeing_shapes(name, shape):
    h, w, ids, logits, lse = _inputs()
    given = {"teacher_ids": ids, "teacher_logits": logits, "teacher_lse": lse}
    given[name] = given[name][tuple(slice(0, n) for n in shape)]
    with pytest.raises(ValueError, match=name):
        sparse_kd_loss(h, w, **given)


def test_refuses_more_ids_than_vocab():
    h, w, _, _, _ = _inputs()
    ids = torch.arange(41).expand(5, 41)
    with pytest.raises(ValueError, match=r"k = 41 ids per token; k must lie in \[1, V = 40\]"):
        sparse_kd_loss(h, w, ids, torch.zeros(5, 41), torch.full((5,), 10.0))


def test_refuses_an_lse_below_the_given_logits():
    """An LSE below the support's own, or one stored at another temperature (T = 1 stored,
    T = 0.5 asked), is caught."""
    h, w, ids, logits, lse = _inputs()
    low = torch.logsumexp(logits, dim=-1) - 0.01
    with pytest.raises(ValueError, match=r"smaller than the logsumexp.*teacher_lse\[\d\]"):
        sparse_kd_loss(h, w, ids, logits, low)
    with pytest.raises(ValueError, match="T = 0.5"):
        sparse_kd_loss(h, w, ids, logits, lse, temperature=0.5)


def test_accepts_an_lse_equal_up_to_rounding():
    h, w, ids, logits, _ = _inputs(k=40)
    lse = torch.logsumexp(logits, dim=-1)  # the support is everything: p_tail = 0 up to rounding
    assert torch.isfinite(sparse_kd_loss(h, w, ids, logits, lse.nextafter(lse - 1)))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_refuses_nan_or_inf_teacher(value):
    h, w, ids, logits, lse = _inputs()
    bad = logits.clone()
    bad[0, 0] = value
    with pytest.raises(ValueError, match="teacher_logits .* holds NaN or \\+inf"):
        sparse_kd_loss(h, w, ids, bad, lse)
    bad_lse = lse.clone()
    bad_lse[0] = value
    with pytest.raises(ValueError, match="teacher_lse .* holds NaN or inf"):
        sparse_kd_loss(h, w, ids, logits, bad_lse)


@pytest.mark.parametrize("options,match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"tail": "drop"}, "tail"), ({"divergence": "jsd"}, "divergence"),
    ({"reduction": "avg"}, "reduction"), ({"backend": "tpu"}, "backend"),
])
def test_refuses_bad_options(options, match):
    h, w, ids, logits, lse = _inputs()
    with pytest.raises(ValueError, match=match):
        sparse_kd_loss(h, w, ids, logits, lse, **options)


def test_refuses_an_all_padded_counted_row_when_renormalizing():
    h, w, ids, logits, lse = _inputs()
    logits[2] = -math.inf
    with pytest.raises(ValueError, match="all -inf.*token 2 "):
        sparse_kd_loss(h, w, ids, logits, lse, tail="renormalize")
    assert torch.isfinite(sparse_kd_loss(h, w, ids, logits, lse))  # bucket: p_tail = 1 there


# ---- the row ops themselves: opcheck, gradient in place, backends agree


def _row_inputs(rows, vocab, k, seed, device, std=8.0, temperature=1.0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=gen) * std).to(device)
    _, ids, logits, lse = sparse_teacher((rows,), vocab, k, temperature, std, gen, device=device)
    labels = random_labels((rows,), vocab, gen, device)
    return student, ids, logits, lse, labels


def _arguments(tail, divergence, temperature=1.0, hard_weight=0.0, transformed=False):
    transform = dict(student_softcap=5.0, student_scale=0.5) if transformed else {}
    return sparse_kd_arguments(tail, KDOptions(divergence=divergence, temperature=temperature,
                                               soft_weight=0.8, hard_weight=hard_weight,
                                               **transform))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,divergence", [("bucket", "kl"), ("renormalize", "reverse_kl")])
@pytest.mark.parametrize("with_labels,with_grad,transformed",
                         [(False, False, False), (True, True, False), (True, True, True)])
def test_sparse_rows_opcheck(backend, tail, divergence, with_labels, with_grad, transformed,
                             device):
    student, ids, logits, lse, labels = _row_inputs(5, 37, 6, 2, device, temperature=2.0)
    grad = torch.empty_like(student) if with_grad else None
    torch.library.opcheck(
        row_op(backend, "sparse_kd_rows"),
        (student, ids, logits, lse, labels if with_labels else None, grad,
         *_arguments(tail, divergence, 2.0, 0.5 if with_labels else 0.0, transformed)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transformed", [False, True])
def test_sparse_rows_gradient_in_place(backend, transformed, device):
    """grad_out may be student_logits: the same loss and gradient as a separate buffer, eager
    and compiled (with a student softcap too: f'(z) is read before z is overwritten)."""
    student, ids, logits, lse, labels = _row_inputs(6, 41, 9, 4, device)
    arguments = _arguments("bucket", "reverse_kl", hard_weight=0.2, transformed=transformed)
    op = row_op(backend, "sparse_kd_rows")
    grad = torch.empty_like(student)
    loss = op(student, ids, logits, lse, labels, grad, *arguments)

    def in_place(student, ids, logits, lse, labels):
        student = student.clone()
        return op(student, ids, logits, lse, labels, student, *arguments), student

    for run in (in_place, torch.compile(in_place, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        loss_in_place, grad_in_place = run(student, ids, logits, lse, labels)
        torch.testing.assert_close(loss_in_place, loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_in_place, grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_backends_agree_across_blocks(tail, divergence, device):
    """V = 2053 (past one 2048-column block) and k = 70 (past one 64-id block), T = 0.7, std 30
    (near one-hot rows): every backend's loss and gradient against the torch row op. Both are
    fp32 over V terms: 1e-5 relative."""
    student, ids, logits, lse, labels = _row_inputs(3, 2053, 70, 9, device, std=30.0,
                                                    temperature=0.7)
    arguments = _arguments(tail, divergence, 0.7, 0.3)
    results = {}
    for backend in BACKENDS:
        grad = torch.full_like(student, math.nan)
        loss = row_op(backend, "sparse_kd_rows")(student, ids, logits, lse, labels, grad,
                                                 *arguments)
        results[backend] = loss, grad
    loss_ref, grad_ref = results["torch"]
    for backend, (loss, grad) in results.items():
        assert rel_err(loss, loss_ref) < 1e-5, backend
        assert rel_err(grad, grad_ref) < 1e-5, backend


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_fullgraph(backend, reduction):
    """torch.compile(fullgraph=True): one graph (the data checks become device asserts), the
    same loss and gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    gen = torch.Generator().manual_seed(12)
    h, w, _ = linear_inputs((29,), 8, 53, 6.0, torch.float32, "cpu", gen)
    _, ids, logits, lse = sparse_teacher((29,), 53, 6, 1.5, 6.0, gen)
    labels = random_labels((29,), 53, gen, "cpu")
    h.requires_grad_()
    w.requires_grad_()

    def fn(h, w, ids, logits, lse, labels):
        return sparse_kd_loss(h, w, ids, logits, lse, labels, temperature=1.5, hard_weight=0.4,
                              divergence="reverse_kl", reduction=reduction, backend=backend,
                              chunk_size=16)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=counter)):
        h.grad = w.grad = None
        loss = run(h, w, ids, logits, lse, labels)
        loss.sum().backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    torch._dynamo.reset()
    assert counter.frame_count == 1
    for compiled, eager in zip(*reversed(results)):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", NATIVE_BACKEND])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gradcheck_float64(tail, backend, device):
    """float64 end to end: torch.autograd.gradcheck on the hidden states, weight and bias."""
    gen = torch.Generator().manual_seed(21)
    h, w, b = linear_inputs((5,), 4, 23, 3.0, torch.float64, device, gen, True)
    _, ids, logits, lse = sparse_teacher((5,), 23, 4, 1.3, 3.0, gen, device=device,
                                         dtype=torch.float64, lse_dtype=torch.float64)
    labels = random_labels((5,), 23, gen, device)
    inputs = [t.requires_grad_() for t in (h, w, b)]

    def fn(h, w, b):
        return sparse_kd_loss(h, w, ids, logits, lse, labels, student_bias=b, tail=tail,
                              temperature=1.3, hard_weight=0.2, reduction="none",
                              backend=backend, chunk_size=2)

    assert torch.autograd.gradcheck(fn, inputs)


def test_int32_ids_and_half_lse_are_accepted():
    """int32 ids equal int64 ones; a bf16 lse is checked with bf16's rounding slack."""
    gen = torch.Generator().manual_seed(4)
    h, w, _ = linear_inputs((7,), 8, 61, 5.0, torch.float32, "cpu", gen)
    _, ids, logits, lse = sparse_teacher((7,), 61, 5, 1.0, 5.0, gen)
    base = sparse_kd_loss(h, w, ids, logits, lse)
    assert torch.equal(sparse_kd_loss(h, w, ids.int(), logits, lse), base)
    _, ids, logits, lse = sparse_teacher((7,), 61, 61, 1.0, 5.0, gen, dtype=torch.bfloat16,
                                         lse_dtype=torch.bfloat16)  # k = V: lse_S = lse
    assert torch.isfinite(sparse_kd_loss(h, w, ids, logits, lse))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_a_vanishing_student_tail_keeps_its_precision(divergence, backend, device):
    """The student puts ~all its mass on the k ids (q_tail ~ e^-60) while the teacher keeps
    p_tail ~ 1e-2: q_tail = 1 - sum q would round to 0 (an infinite KL); the row ops sum it
    off the support instead, so the loss and gradients match the float64 oracle (1e-4: fp32)."""
    gen = torch.Generator().manual_seed(31)
    leading, vocab, k = (6,), 97, 5
    h, w, _ = linear_inputs(leading, 8, vocab, 3.0, torch.float32, device, gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(6)]).to(device)
    bias = torch.zeros(vocab, device=device).index_fill_(0, ids[0], 60.0)  # row 0's ids
    ids[:] = ids[0]  # every token's ids: the boosted ones
    z_t = torch.randn(*leading, vocab, generator=gen, dtype=torch.float64).to(device)
    z_t.scatter_add_(1, ids, torch.full(ids.shape, 8.0, dtype=torch.float64, device=device))
    logits, lse = z_t.gather(1, ids).float(), torch.logsumexp(z_t, dim=-1).float()
    ours = [t.clone().requires_grad_() for t in (h, w, bias)]
    refs = [t.clone().double().requires_grad_() for t in (h, w, bias)]
    loss = sparse_kd_loss(*ours[:2], ids, logits, lse, student_bias=ours[2],
                          divergence=divergence, backend=backend)
    ref = sparse_kd_loss_reference(*refs[:2], ids, logits, lse, student_bias=refs[2],
                                   divergence=divergence)
    loss.backward()
    ref.backward()
    assert ref > 0.1  # the tail term dominates: p_tail log(p_tail / q_tail) ~ 1e-2 * 55
    assert_close(loss, ref, ours, refs, 1e-4)
