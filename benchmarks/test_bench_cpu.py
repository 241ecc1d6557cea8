"""pytest-benchmark suite of CPU-sized cases, torch backend (``make bench``).

    pytest benchmarks/test_bench_cpu.py --benchmark-only
    pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-autosave   # keep a baseline
    pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-compare    # against it

Each test times forward + backward of one method on one case (the methods and inputs of
``bench_kernels.py``), grouped by case so fastkd and the materializing PyTorch loss sit side by
side. Only the normal ``pytest tests`` run is the correctness suite; this file lies outside
``testpaths`` and is collected only when named.
"""

from __future__ import annotations

import cases as C
import pytest
import torch

OPTIONS = dict(dtype="fp32", T=1.0, beta=0.5, divergence="kl")
CASES = [
    C.Case("vocab", "vocab N=256 V=16384 kl", dict(N=256, V=16384, Hs=128, Ht=256, **OPTIONS)),
    C.Case("vocab", "vocab N=256 V=16384 jsd",
           dict(N=256, V=16384, Hs=128, Ht=256, **{**OPTIONS, "divergence": "jsd"})),
    C.Case("logits", "logits N=256 V=16384 kl", dict(N=256, V=16384, **OPTIONS)),
    C.Case("multi_teacher", "multi_teacher K=2 N=128 V=16384",
           dict(K=2, N=128, V=16384, Hs=128, Ht=256, **OPTIONS)),
    C.Case("attention", "attention L=256 H=8 Hkv=2",
           dict(B=1, H=8, Hkv=2, L=256, Ds=32, Dt=64, causal=True, loss="mse", **OPTIONS)),
]
METHOD_NAMES = ("torch (materialized)", "fastkd torch")
ROUNDS = 5


@pytest.mark.parametrize("method_name", METHOD_NAMES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_backward(benchmark, case: C.Case, method_name: str) -> None:
    method = next(m for m in C.METHODS[case.suite] if m.name == method_name)
    skip = method.available(case, "cpu")
    if skip is not None:
        pytest.skip(skip.reason)
    inputs = C.make_inputs(case, "cpu")
    loss_fn = method.build(inputs, case)
    students = C.student_tensors(inputs)

    def step() -> torch.Tensor:
        for tensor in students:
            tensor.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    benchmark.group = case.name
    flop = C.flops(case, "fwd+bwd")
    benchmark.extra_info.update(params=case.params, flops=flop)
    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    assert torch.isfinite(loss)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in students)
