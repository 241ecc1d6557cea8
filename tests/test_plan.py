"""The chunk plan (fastkd/plan.py): speed first within the memory cap, and its cost model."""

from __future__ import annotations

import pytest

from fastkd.plan import GRAD_CHUNKS, H100, ChunkPlan, Machine, chunk_buffers, plan_chunks, predict

HEADLINE = dict(tokens=8192, vocab=128256, student_hidden=2048, teacher_hiddens=[4096],
                weight_bytes=2)


@pytest.fixture(autouse=True)
def default_cap(monkeypatch):
    monkeypatch.delenv("FASTKD_CHUNK_MEMORY", raising=False)


def test_cost_model_matches_a_hand_count():
    """N = 1024, V = 1000, Hs = 64, Ht = 128, bf16, C = 256, 512 gradient rows per pass."""
    machine = Machine("test", flops=1e12, bandwidth=1e11)
    cost = predict(ChunkPlan(256, 512), 1024, 1000, 64, [128], 2, machine)
    logit_flops = 2 * 1024 * 1000 * (64 + 128)
    grad_flops = 4 * 1024 * 1000 * 64
    # logit GEMMs: 4 chunks x V x 192 weights + N x 192 hidden (bf16), N x V x 2 fp32 logits
    logit_bytes = (4 * 1000 * 192 + 1024 * 192) * 2 + 1024 * 1000 * 4 * 2
    # row op: 2 reads of both fp32 rows, one bf16 gradient write
    row_bytes = 1024 * 1000 * 4 * 2 * 2 + 1024 * 1000 * 2
    # gradient GEMMs: the bf16 gradient rows twice, 2 passes x (W + the fp32 grad W read and
    # written), 3 x N x Hs for the hidden rows, their gradient and its scale
    grad_bytes = 2 * 1024 * 1000 * 2 + 2 * 1000 * 64 * (2 + 8) + 3 * 1024 * 64 * 2
    assert cost.flops == logit_flops + grad_flops
    assert cost.bytes == logit_bytes + row_bytes + grad_bytes
    expected = (max(logit_flops / 1e12, logit_bytes / 1e11) + row_bytes / 1e11
                + max(grad_flops / 1e12, grad_bytes / 1e11))
    assert cost.seconds == pytest.approx(expected, rel=1e-12)
    assert cost.floor == pytest.approx((logit_flops + grad_flops) / 1e12, rel=1e-12)


def test_headline_plan_is_speed_first_within_two_gigabytes():
    plan = plan_chunks(128256, 1, "triton", True, device_type="cuda", widths=(2048, 4096),
                       tokens=8192)
    assert plan.rows >= 512 and plan.grad_rows % plan.rows == 0
    buffers = plan.rows * 4 * 128256 * chunk_buffers("triton", 1) + plan.grad_rows * 2 * 128256
    fp32_weight_grad = 128256 * 2048 * 4
    assert buffers + fp32_weight_grad <= 2e9
    cost = predict(plan, **HEADLINE, machine=H100)
    assert cost.ratio <= 1.4
    # 128-token chunks re-read both lm_heads 64 times: bandwidth-bound logit GEMMs
    assert predict(ChunkPlan(128, 1024), **HEADLINE, machine=H100).ratio > 1.8


def test_cap_bounds_the_working_set(monkeypatch):
    monkeypatch.setenv("FASTKD_CHUNK_MEMORY", str(64 * 2**20))
    for vocab, backend, half in [(65536, "torch", False), (131072, "cpp", True),
                                 (256000, "triton", True)]:
        plan = plan_chunks(vocab, 2, backend, half, widths=(512, 512, 256), tokens=4096)
        used = plan.rows * 4 * vocab * chunk_buffers(backend, 2) + (
            plan.grad_rows * 2 * vocab if half else 0)
        assert used <= 64 * 2**20 or plan.rows == 16
        assert plan.rows % 16 == 0 and plan.grad_rows <= plan.rows * GRAD_CHUNKS


def test_cpu_plan_reaches_the_speed_rows_for_the_native_op():
    """The C++ row op needs no scratch: 256-token chunks fit the cap at V = 131,072 in fp32,
    where the torch row op's temporaries allow 64."""
    native = plan_chunks(131072, 1, "cpp", False, widths=(512, 512), tokens=1024)
    torch_op = plan_chunks(131072, 1, "torch", False, widths=(512, 512), tokens=1024)
    assert (native.rows, torch_op.rows) == (256, 64)


def test_chunk_size_overrides_and_rows_never_fall_below_16():
    assert plan_chunks(65536, 3, "torch", False, chunk_size=7).rows == 7
    assert plan_chunks(10**9, 1, "triton", False).rows == 16


def test_cost_model_report_prints_the_plan_and_its_prediction():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "cost_model.py"
    done = subprocess.run([sys.executable, str(script), "--vocab", "256000"], text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fastkd's plan: rows 304, gradient rows 608" in done.stdout
    assert "chunk_size=128: rows 128" in done.stdout
    bad = subprocess.run([sys.executable, str(script), "--tokens", "0"], text=True,
                         capture_output=True, timeout=120)
    assert bad.returncode == 2 and "must be positive" in bad.stderr


@pytest.mark.parametrize("value, message", [("abc", "must be a whole number of bytes, got 'abc'"),
                                            ("1e9", "must be a whole number of bytes"),
                                            ("0", "must be > 0 bytes, got 0"),
                                            ("-5", "must be > 0 bytes, got -5")])
def test_a_bad_chunk_memory_is_named(monkeypatch, value, message):
    monkeypatch.setenv("FASTKD_CHUNK_MEMORY", value)
    with pytest.raises(ValueError, match=f"FASTKD_CHUNK_MEMORY {message}"):
        plan_chunks(65536, 1, "cpp", False)


def test_an_empty_chunk_memory_is_the_default(monkeypatch):
    monkeypatch.setenv("FASTKD_CHUNK_MEMORY", "")
    assert plan_chunks(256000, 1, "triton", True, device_type="cuda", widths=(2048, 4096),
                       tokens=8192) == ChunkPlan(304, 608)
