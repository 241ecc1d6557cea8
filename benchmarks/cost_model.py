"""The chunk plan and its predicted time for any shape and machine (fastkd/plan.py).

    python benchmarks/cost_model.py                              # the headline shape, H100
    python benchmarks/cost_model.py --vocab 256000 --chunk-size 128
    python benchmarks/cost_model.py --flops 989e12 --bandwidth 4.8e12   # an H200's peaks

Prints the plan fastkd picks (rows per chunk, gradient rows per pass, extra memory), its
predicted time and ratio to the matmul floor, and the same for a fixed-chunk plan to compare.
A GPU run of bench_kernels.py is read against these figures.
"""

from __future__ import annotations

import argparse
import sys

from fastkd.plan import H100, ChunkPlan, Machine, chunk_buffers, plan_chunks, predict

GB = 1e9


def describe(plan: ChunkPlan, args: argparse.Namespace, machine: Machine) -> str:
    weight_bytes = 4 if args.dtype == "fp32" else 2
    cost = predict(plan, args.tokens, args.vocab, args.student_hidden, args.teacher_hidden,
                   weight_bytes, machine)
    teachers = len(args.teacher_hidden)
    buffers = plan.rows * 4 * args.vocab * chunk_buffers("triton", teachers)
    if weight_bytes == 2:
        buffers += plan.grad_rows * 2 * args.vocab
    weight_grad = 4 * args.vocab * args.student_hidden
    return (f"rows {plan.rows}, gradient rows {plan.grad_rows}: "
            f"{cost.seconds * 1e3:.1f} ms predicted, floor {cost.floor * 1e3:.1f} ms "
            f"(x{cost.ratio:.2f}); {cost.flops / 1e12:.1f} TFLOP, {cost.bytes / GB:.0f} GB moved; "
            f"extra memory {buffers / GB:.2f} GB buffers + {weight_grad / GB:.2f} GB fp32 "
            "weight gradient")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--student-hidden", type=int, default=2048)
    parser.add_argument("--teacher-hidden", type=int, action="append",
                        help="a teacher's hidden size; repeat the flag once per teacher "
                             "(default one of 4096)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--flops", type=float, default=H100.flops, help="peak GEMM FLOP/s")
    parser.add_argument("--bandwidth", type=float, default=H100.bandwidth, help="bytes/s")
    parser.add_argument("--device-type", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--chunk-size", type=int, default=128,
                        help="the fixed-chunk plan to compare with (default 128)")
    args = parser.parse_args(argv)
    args.teacher_hidden = args.teacher_hidden or [4096]
    sizes = [args.tokens, args.vocab, args.student_hidden, *args.teacher_hidden, args.chunk_size]
    if min(sizes) < 1 or args.flops <= 0 or args.bandwidth <= 0:
        parser.error("sizes, --flops and --bandwidth must be positive")
    machine = Machine("given", args.flops, args.bandwidth)
    half = args.dtype != "fp32"
    try:
        chosen = plan_chunks(args.vocab, len(args.teacher_hidden), "triton", half,
                             device_type=args.device_type,
                             widths=(args.student_hidden, *args.teacher_hidden),
                             tokens=args.tokens)
    except ValueError as error:  # a bad FASTKD_CHUNK_MEMORY
        parser.error(str(error))
    fixed = plan_chunks(args.vocab, len(args.teacher_hidden), "triton", half, args.chunk_size,
                        args.device_type)
    print(f"N={args.tokens} V={args.vocab} Hs={args.student_hidden} "
          f"Ht={','.join(map(str, args.teacher_hidden))} {args.dtype}, "
          f"{args.flops / 1e12:.0f} TFLOP/s, {args.bandwidth / 1e12:.2f} TB/s")
    print(f"  fastkd's plan: {describe(chosen, args, machine)}")
    print(f"  chunk_size={args.chunk_size}: {describe(fixed, args, machine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
