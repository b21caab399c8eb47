"""Extra memory and time of gem_fast's kernels at one shape, predicted (gem_fast/plan/kernel.py).

    python scripts/plan_kernel.py                                  # the GPU goal shape, bf16
    python scripts/plan_kernel.py --tokens 4096 --hidden 576 --vocab 49152 --dtype fp32 --device cpu

Prints a markdown table: per op (forward+backward) and backend, the chunk rows, the extra memory
beyond inputs and their gradients, GEMM FLOPs, and the time of the GEMMs and of the row passes
predicted from a matmul rate and a memory bandwidth (defaults: bf16 dense ~790 TFLOP/s and ~3.0 TB/s, as measured on an H100/H200
by others; pass the rates of your device). The memory model is checked against op-by-op traces
and a resident-memory probe by tests/test_plan_kernel.py; the times are a model, not a measurement.
"""

from __future__ import annotations

import argparse
import sys

from gem_fast.errors import ArgumentParser, add_debug_flag, entry_point, number
from gem_fast.kernels.chunked import DW_ACCUMULATIONS
from gem_fast.plan.kernel import OPS, KernelPlan, plan_kernel

ELEMENT_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
MIB = 2**20


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=number(int, above=0), default=32768)
    parser.add_argument("--hidden", type=number(int, above=0), default=4096)
    parser.add_argument("--vocab", type=number(int, above=0), default=128256)
    parser.add_argument("--dtype", choices=sorted(ELEMENT_SIZES), default="bf16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="sets the default block budget and row tiles (and the backends: triton on cuda)")
    parser.add_argument("--block_bytes", type=number(int, above=0),
                        help="bytes of one [chunk, V] block (default: the device's)")
    parser.add_argument("--dw_accumulation", choices=DW_ACCUMULATIONS, default="input")
    parser.add_argument("--matmul_tflops", type=number(float, above=0), default=790.0)
    parser.add_argument("--bandwidth_tbs", type=number(float, above=0), default=3.0)
    add_debug_flag(parser)
    return parser


def plans(args: argparse.Namespace) -> list[KernelPlan]:
    fused = ("triton", "torch") if args.device == "cuda" else ("torch",)
    out = []
    for op in OPS:
        for backend in (*fused, "naive") if op != "entropy" else fused:
            out.append(plan_kernel(op, args.tokens, args.hidden, args.vocab, element_size=ELEMENT_SIZES[args.dtype],
                                   backend=backend, device_type=args.device, block_bytes=args.block_bytes,
                                   dw_accumulation=args.dw_accumulation))
    return out


def markdown(rows: list[KernelPlan], args: argparse.Namespace) -> str:
    rate, bandwidth = args.matmul_tflops * 1e12, args.bandwidth_tbs * 1e12
    lines = ["| op (fwd+bwd) | backend | chunk rows | extra MiB | of which | GEMM TFLOP | GEMM ms | row passes ms | "
             "share of matmul rate |", "|---|---|---|---|---|---|---|---|---|"]
    for plan in rows:
        gemm_s, row_s = plan.gemm_seconds(rate), plan.row_seconds(bandwidth)
        share = "–" if row_s is None or not plan.gemm_flops else f"{gemm_s / (gemm_s + row_s):.0%}"
        terms = ", ".join(f"{name} {size / MIB:,.0f}" for name, size in plan.terms if size)
        streams = plan.backend == "triton" and plan.op == "entropy"
        rows_text = "–" if plan.backend == "naive" else "all" if streams else str(plan.chunk_rows)
        row_text = "not modelled" if row_s is None else f"{row_s * 1e3:.1f}"
        lines.append(f"| {plan.op} | {plan.backend} | {rows_text} | {plan.extra_bytes / MIB:,.0f} | {terms} | "
                     f"{plan.gemm_flops / 1e12:.1f} | {gemm_s * 1e3:.1f} | {row_text} | {share} |")
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"N={args.tokens}, H={args.hidden}, V={args.vocab}, {args.dtype} on {args.device}, "
          f"dW accumulation {args.dw_accumulation}; {args.matmul_tflops:g} TFLOP/s, {args.bandwidth_tbs:g} TB/s\n")
    print(markdown(plans(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
