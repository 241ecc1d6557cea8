"""Compile every Triton kernel for Hopper (sm_90) ahead of time; no GPU needed.

Run as a script (``python tests/hopper_compile.py``) with the interpreter off: it prints one
JSON object mapping each case name to "ok" or the compiler's error, and the bytes of stack each
thread of the compiled kernel spills registers to (``cuobjdump --dump-resource-usage``). Kernel
modules register their cases in CASES below.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)

KD_ROWS_SIGNATURE = {
    "s_ptr": "*fp32", "t_ptr": "*bf16", "grad_ptr": "*bf16", "labels_ptr": "*i64",
    "loss_ptr": "*fp32", "V": "i32", "stride_s": "i64", "stride_t": "i64", "stride_g": "i64",
    "temperature": "fp32", "beta": "fp32", "one_minus_beta": "fp32", "log_odds_beta": "fp32",
    "binary_entropy": "fp32", "soft_weight": "fp32", "hard_weight": "fp32",
    "ignore_index": "i32", "s_scale": "fp32", "s_cap": "fp32", "s_scale_over_cap": "fp32",
    "t_scale": "fp32", "t_cap": "fp32", "t_scale_over_cap": "fp32",
}


def kd_rows_cases():
    from fastkd.kernels.kd_rows import _kd_rows_kernel

    for divergence, labels, grad in itertools.product(range(3), [False, True], [False, True]):
        constexprs = dict(DIVERGENCE=divergence, HAS_LABELS=labels, HAS_HARD=labels,
                          COMPUTE_GRAD=grad, BLOCK_V=2048, STUDENT_TRANSFORM=0,
                          TEACHER_TRANSFORM=0)
        yield f"kd_rows-{divergence}-{labels}-{grad}", _kd_rows_kernel, KD_ROWS_SIGNATURE, \
            constexprs, 8


def kd_rows_transform_cases():
    """The logit transforms' variants (STUDENT_TRANSFORM / TEACHER_TRANSFORM: 0 none, 1 scale,
    2 softcap), with labels and the gradient (the most live state)."""
    from fastkd.kernels.kd_rows import _kd_rows_kernel

    for divergence, (student, teacher) in itertools.product(range(3), [(2, 0), (0, 2), (2, 2),
                                                                      (1, 1)]):
        constexprs = dict(DIVERGENCE=divergence, HAS_LABELS=True, HAS_HARD=True,
                          COMPUTE_GRAD=True, BLOCK_V=2048, STUDENT_TRANSFORM=student,
                          TEACHER_TRANSFORM=teacher)
        yield (f"kd_rows_transform-{divergence}-{student}-{teacher}", _kd_rows_kernel,
               KD_ROWS_SIGNATURE, constexprs, 8)


MULTI_TEACHER_SIGNATURE = {
    "s_ptr": "*fp32", "t_ptr": "*fp32", "grad_ptr": "*fp32", "labels_ptr": "*i64",
    "priors_ptr": "*fp32", "loss_ptr": "*fp32", "weights_ptr": "*fp32", "V": "i32", "K": "i32",
    "stride_s": "i64", "stride_tk": "i64", "stride_t": "i64", "stride_g": "i64",
    "temperature": "fp32", "entropy_tau": "fp32", "soft_weight": "fp32", "hard_weight": "fp32",
    "ignore_index": "i32", "s_scale": "fp32", "s_cap": "fp32", "s_scale_over_cap": "fp32",
    "t_transforms_ptr": "*fp32",
}


def multi_teacher_cases():
    from fastkd.kernels.multi_teacher_rows import _multi_teacher_rows_kernel

    for entropy, mixture, labels, grad, k_pad in itertools.product(
        [False, True], [False, True], [False, True], [False, True], [1, 4]
    ):
        constexprs = dict(ENTROPY_WEIGHTING=entropy, MIXTURE=mixture, HAS_LABELS=labels,
                          HAS_HARD=labels, COMPUTE_GRAD=grad, K_PAD=k_pad, BLOCK_V=1024 // k_pad,
                          STUDENT_TRANSFORM=0, TEACHER_TRANSFORM=False)
        yield (f"multi_teacher-{entropy}-{mixture}-{labels}-{grad}-{k_pad}",
               _multi_teacher_rows_kernel, MULTI_TEACHER_SIGNATURE, constexprs, 8)


def multi_teacher_transform_cases():
    """The student's (STUDENT_TRANSFORM) and the teachers' (TEACHER_TRANSFORM) transforms."""
    from fastkd.kernels.multi_teacher_rows import _multi_teacher_rows_kernel

    for mixture, (student, teachers), k_pad in itertools.product(
            [False, True], [(2, True), (0, True), (1, False)], [1, 4]):
        block_v = (512 if teachers else 1024) // k_pad  # the launcher's (halved for teachers)
        constexprs = dict(ENTROPY_WEIGHTING=True, MIXTURE=mixture, HAS_LABELS=True,
                          HAS_HARD=True, COMPUTE_GRAD=True, K_PAD=k_pad, BLOCK_V=block_v,
                          STUDENT_TRANSFORM=student, TEACHER_TRANSFORM=teachers)
        yield (f"multi_teacher_transform-{mixture}-{student}-{teachers}-{k_pad}",
               _multi_teacher_rows_kernel, MULTI_TEACHER_SIGNATURE, constexprs, 8)


SPARSE_ROWS_SIGNATURE = {
    "s_ptr": "*fp32", "bits_ptr": "*i32", "ids_ptr": "*i64", "logp_ptr": "*fp32",
    "log_tail_ptr": "*fp32", "grad_ptr": "*bf16", "labels_ptr": "*i64", "loss_ptr": "*fp32",
    "V": "i32", "k": "i32", "stride_s": "i64", "stride_bits": "i64", "stride_ids": "i64",
    "stride_logp": "i64", "stride_g": "i64", "temperature": "fp32", "soft_weight": "fp32",
    "hard_weight": "fp32", "ignore_index": "i32", "s_scale": "fp32", "s_cap": "fp32",
    "s_scale_over_cap": "fp32",
}


def sparse_transform_cases():
    """The sparse kernel with the student's scale (STUDENT_TRANSFORM 1) or softcap (2)."""
    from fastkd.kernels.sparse_rows import _sparse_rows_kernel

    for bucket, reverse, student in itertools.product([False, True], [False, True], [1, 2]):
        constexprs = dict(BUCKET=bucket, REVERSE=reverse, HAS_LABELS=True, HAS_HARD=True,
                          COMPUTE_GRAD=True, BLOCK_V=2048, BLOCK_K=64, STUDENT_TRANSFORM=student)
        yield (f"sparse_rows-{bucket}-{reverse}-{student}", _sparse_rows_kernel,
               SPARSE_ROWS_SIGNATURE, constexprs, 8)


from attention_hopper_cases import attention_cases  # noqa: E402 (beside this script)

CASES = [kd_rows_cases, multi_teacher_cases, attention_cases, kd_rows_transform_cases,
         multi_teacher_transform_cases, sparse_transform_cases]


def compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int):
    full_signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps})


def spilled_bytes(cubin: bytes) -> int:
    """Stack bytes per thread of a cubin's kernel: registers that did not fit spill there."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage",
                                file.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def main() -> None:
    results, spills = {}, {}
    for family in CASES:
        for name, kernel, signature, constexprs, num_warps in family():
            try:
                compiled = compile_for_hopper(kernel, signature, constexprs, num_warps)
                results[name] = "ok" if compiled.asm.get("cubin") else "no cubin"
                spills[name] = spilled_bytes(compiled.asm["cubin"])
            except Exception as error:  # noqa: BLE001 - reported back to the test
                results[name] = f"{type(error).__name__}: {error}"[:2000]
    print(json.dumps({"results": results, "spills": spills}))


if __name__ == "__main__":
    main()
