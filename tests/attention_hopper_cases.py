"""Ahead-of-time sm_90 compile cases of the attention kernels, for tests/hopper_compile.py.

Five corners per kernel and flag, each compiled with the tiles its launcher picks
(``attention_tiles``): bf16 / causal / padded at head dims 128 (the attention benchmark's
shape) and 256, bf16 / full / unpadded at head dim 64, fp32 / full / unpadded at head dims 64
and 32, and fp32 / causal / padded at head dim 128. fp32 at head dim 256 is left out (its dK
spills 112 bytes, and it compiles slowly). All constexpr combinations were compiled once by
hand (112 variants, all ok); these keep the test short.
"""

from __future__ import annotations

from functools import partial

import torch

CORNERS = [
    ("bf16", 128, 128, dict(CAUSAL=True, HAS_MASK=True)),
    ("bf16", 64, 64, dict(CAUSAL=False, HAS_MASK=False)),
    ("bf16", 256, 256, dict(CAUSAL=True, HAS_MASK=True)),
    ("fp32", 64, 32, dict(CAUSAL=False, HAS_MASK=False)),
    ("fp32", 128, 128, dict(CAUSAL=True, HAS_MASK=True)),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _signature(dtype: str, *extra: str, out: str | None = None) -> dict:
    sig = {name: f"*{dtype}" for name in ("qs_ptr", "ks_ptr", "qt_ptr", "kt_ptr")}
    sig["ok_ptr"] = "*i8"
    sig.update(dict.fromkeys(extra, "*fp32"))
    if out is not None:
        sig[out] = f"*{dtype}"
    sig.update({"scale_s": "fp32", "scale_t": "fp32"})
    sig.update(dict.fromkeys(("H", "L", "DS", "DT", "GROUP_S", "GROUP_T"), "i32"))
    return sig


def _meta(flags: dict, block_ds: int, block_dt: int, tiles, **more) -> dict:
    return {**flags, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_DS": block_ds,
            "BLOCK_DT": block_dt, **more}


def attention_cases():
    from fastkd.kernels.attention_backward import _dk_kernel, _dq_kernel
    from fastkd.kernels.attention_common import attention_tiles, block_d
    from fastkd.kernels.attention_loss import _attention_mse_kernel
    from fastkd.kernels.attention_lse import _attention_lse_kernel

    for dtype, d_s, d_t, flags in CORNERS:
        tiles = attention_tiles(d_s, d_t, (DTYPES[dtype],) * 2, interpreted=False)
        meta = partial(_meta, flags, block_d(d_s), block_d(d_t))

        corner = f"{dtype}-d{d_s}"
        forward = tiles["forward"]
        for kl in (True, False):
            sig = _signature(dtype, "lse_s_ptr", "lse_t_ptr", "kl_ptr")
            yield (f"attn_lse-{corner}-kl{kl}", _attention_lse_kernel, sig,
                   meta(forward, COMPUTE_KL=kl), forward.num_warps)
        sig = _signature(dtype, "lse_s_ptr", "lse_t_ptr", "loss_ptr", "delta_ptr")
        yield f"attn_mse-{corner}", _attention_mse_kernel, sig, meta(forward), forward.num_warps
        for mse in (True, False):
            for name, kernel, out in (("dq", _dq_kernel, "dq_ptr"), ("dk", _dk_kernel, "dk_ptr")):
                sig = _signature(dtype, "lse_s_ptr", "lse_t_ptr", "delta_ptr", "w_ptr", out=out)
                yield (f"attn_{name}-{corner}-mse{mse}", kernel, sig,
                       meta(tiles[name], LOSS_MSE=mse), tiles[name].num_warps)
