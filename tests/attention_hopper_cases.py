"""Ahead-of-time sm_90 compile cases of the attention kernels, for tests/hopper_compile.py.

Two corners per kernel and flag: bf16 / causal / padded / head dim 128 (8 warps), and
fp32 / full / unpadded / head dim 64 (4 warps). All constexpr combinations were compiled once
by hand (112 variants, all ok); these keep the test short.
"""

from __future__ import annotations

CORNERS = [
    ("bf16", dict(CAUSAL=True, HAS_MASK=True, BLOCK_M=64, BLOCK_N=64, BLOCK_DS=128,
                  BLOCK_DT=128), 8),
    ("fp32", dict(CAUSAL=False, HAS_MASK=False, BLOCK_M=64, BLOCK_N=64, BLOCK_DS=64,
                  BLOCK_DT=32), 4),
]  # fmt: skip


def _signature(dtype: str, *extra: str, out: str | None = None) -> dict:
    sig = {name: f"*{dtype}" for name in ("qs_ptr", "ks_ptr", "qt_ptr", "kt_ptr")}
    sig["ok_ptr"] = "*i8"
    sig.update(dict.fromkeys(extra, "*fp32"))
    if out is not None:
        sig[out] = f"*{dtype}"
    sig.update({"scale_s": "fp32", "scale_t": "fp32"})
    sig.update(dict.fromkeys(("H", "L", "DS", "DT", "GROUP_S", "GROUP_T"), "i32"))
    return sig


def attention_cases():
    from fastkd.kernels.attention_backward import _dk_kernel, _dq_kernel
    from fastkd.kernels.attention_loss import _attention_mse_kernel
    from fastkd.kernels.attention_lse import _attention_lse_kernel

    for dtype, meta, warps in CORNERS:
        for kl in (True, False):
            sig = _signature(dtype, "lse_s_ptr", "lse_t_ptr", "kl_ptr")
            yield (
                f"attn_lse-{dtype}-kl{kl}",
                _attention_lse_kernel,
                sig,
                {**meta, "COMPUTE_KL": kl},
                warps,
            )
        sig = _signature(dtype, "lse_s_ptr", "lse_t_ptr", "loss_ptr", "delta_ptr")
        yield f"attn_mse-{dtype}", _attention_mse_kernel, sig, meta, warps
        for mse in (True, False):
            for name, kernel, out in (("dq", _dq_kernel, "dq_ptr"), ("dk", _dk_kernel, "dk_ptr")):
                sig = _signature(dtype, "lse_s_ptr", "lse_t_ptr", "delta_ptr", "w_ptr", out=out)
                yield f"attn_{name}-{dtype}-mse{mse}", kernel, sig, {**meta, "LOSS_MSE": mse}, warps
