"""Instructions of the selection's scoring kernel for Hopper (sm_90), counted without a GPU.

Triton compiles for a CUDA target on any machine (its own ptxas and cuobjdump come with it), so
the kernel's SASS can be read here: per thread, one program (BLOCK_U units, no loops) runs
straight through it, so the count is what each warp issues per block of units. This is no
timing (`benchmarks/decode_attention.py` on the GPU is), but it shows what a change to the
kernel's arithmetic costs in issue slots: at 128k, batch 16 and 8 KV heads the kernel runs
16,384 programs of 4 warps. Pointer arguments are taken as 16-byte aligned, as Triton's launcher
specialises them.

    python benchmarks/sass_count.py --out benchmarks/results/sass_score_kernel_sm90.md

Another commit's kernel: `git worktree add /tmp/wt COMMIT`, copy this script into it, link
`tactic_server/kernels` to `../kernels` there (the package maps it so only when installed) and
run the copy from /tmp/wt.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "offsets_ptr": "*i32", "req_to_segment_ptr": "*i32",
            "req_to_token_ptr": "*i32", "req_pool_ptr": "*i32", "seq_lens_ptr": "*i32",
            "clustered_ptr": "*i32", "log_mass_ptr": "*fp32", "unit_size_ptr": "*i32",
            "forced_ptr": "*i8", "token_cluster_ptr": "*i32", "mass_hist_ptr": "*fp32",
            "profiles_ptr": "*fp16", "clustered_out_ptr": "*i32",
            "unit_bin_ptr": "*i16"}  # fmt: skip
FLOATS = ("scale", "lowest_density", "inverse_bin_width", "bin_width")


def score_kernel_sass(module, centroids: str, variance_dims: int, head_dim: int, group: int,
                      block_u: int, real_rows: bool = True,
                      resources: bool = False, profile: int = 0,
                      max_registers: int = 0) -> str:  # fmt: skip
    """SASS of module's _score_units_kernel as select_rows would launch it on a bf16 cache
    (real_rows, max_registers: its real_rows, score_max_registers; profile: its PROFILE, 2
    for compact "profile" variances with variance_dims 1); resources: the cubin's resource
    usage (registers a thread) instead."""
    kernel = module._score_units_kernel
    codes = "*u8" if hasattr(module, "VARIANCE_BIAS") else "*fp8e5"  # before / after e5m2
    pointers = dict(POINTERS, centroids_ptr="*" + centroids,
                    variances_ptr=codes if variance_dims > 1 else "*fp32")  # fmt: skip
    constants = dict(GROUP=group, HEAD_DIM=head_dim, SEGMENT=1024, CLUSTERS=64,
                     BLOCK_H=max(16, triton.next_power_of_2(group)),
                     BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_U=block_u, BLOCK_F=2,
                     ATTEND_TAIL=False, VARIANCE_DIMS=variance_dims, PROFILE=profile, BINS=2048,
                     CLUSTERED_GIVEN=False,
                     GROUP_PAD=(triton.next_power_of_2(group) if real_rows
                                else max(16, triton.next_power_of_2(group))),
                     DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32",
                     VARIANCE_DOT_DTYPE=tl.bfloat16 if codes == "*u8" else tl.float16,
                     INTERPRETED=False, USE_PDL=False)  # fmt: skip
    if "STREAM_EVICTION" in kernel.arg_names:  # a kernel from before it had no such argument
        constants["STREAM_EVICTION"] = ""  # select_rows' default: no L2 hints
    return kernel_sass(kernel, constants, pointers, resources, max_registers)


def exact_kernel_sass(module, head_dim: int, group: int, real_rows: bool = True,
                      resources: bool = False) -> str:  # fmt: skip
    """SASS of module's _exact_units_kernel as select_rows launches it on a bf16 cache from 64
    rows up ([8 clusters, 16 members] a step); real_rows: its real_rows. It loops over a
    cluster's members, so its static count is per step plus the rest, not per program."""
    block_h = max(16, triton.next_power_of_2(group))
    constants = dict(GROUP=group, HEAD_DIM=head_dim, SEGMENT=1024, CLUSTERS=64, BINS=2048,
                     BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_E=8,
                     BLOCK_M=16, GROUP_PAD=triton.next_power_of_2(group) if real_rows else block_h,
                     DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", USE_PDL=False)  # fmt: skip
    pointers = dict(POINTERS, member_slots_ptr="*i32", exact_threshold_ptr="*i32",
                    exact_units_ptr="*i32", exact_count_ptr="*i32")  # fmt: skip
    return kernel_sass(module._exact_units_kernel, constants, pointers, resources)


def kernel_sass(kernel, constants: dict, pointers: dict, resources: bool,
                max_registers: int = 0) -> str:  # fmt: skip
    """SASS (or resource usage) of a Triton kernel for sm_90, 4 warps: constants for its
    constexpr arguments, pointer types by name, floats by FLOATS, the rest int32;
    max_registers: ptxas's cap (Triton's maxnreg; 0: none)."""
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
            if name.startswith("stride") or name == "max_units":
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                       attrs=attrs)  # fmt: skip
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 2,
                                       **({"maxnreg": max_registers} if max_registers else {})})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(cuobjdump), "-res-usage" if resources else "-sass",
                               cubin.name], check=True, capture_output=True,
                              text=True).stdout  # fmt: skip


def opcodes(sass: str) -> list[str]:
    """The instructions' opcodes in order (without modifiers or predicates)."""
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9]+)", sass)


def count(sass: str) -> collections.Counter:
    """Instructions per opcode (without modifiers or predicates)."""
    return collections.Counter(opcodes(sass))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--block-u", type=int, default=64)
    parser.add_argument("--padded-rows", action="store_true",
                        help="real_rows=False: the arithmetic on the dots' 16 rows")
    parser.add_argument("--max-registers", type=int, default=0, help="score_max_registers")
    parser.add_argument("--exact", action="store_true",
                        help="the exact-scoring kernel instead (with --padded-rows or not)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from tactic_server.kernels import selection

    if args.exact:
        real_rows = not args.padded_rows
        opcodes = count(exact_kernel_sass(selection, args.head_dim, args.group, real_rows))
        registers = re.search(r"REG:(\d+)", exact_kernel_sass(
            selection, args.head_dim, args.group, real_rows, resources=True))  # fmt: skip
        mufu = sum(n for name, n in opcodes.items() if name == "MUFU")
        text = (f"_exact_units_kernel for sm_90, head_dim {args.head_dim}, group {args.group}, "
                f"[8, 16] steps, real rows {real_rows}: {sum(opcodes.values())} SASS "
                f"instructions (static), {mufu} MUFU, {registers.group(1)} registers a thread; "
                + ", ".join(f"{name} {n}" for name, n in opcodes.most_common(8)) + "\n")
        print(text, end="")
        if args.out:
            args.out.write_text(text)
        return
    rows = []
    for centroids, variance_dims, profile in (("bf16", args.head_dim, 0),
                                              ("fp8e4nv", args.head_dim, 0), ("bf16", 1, 0),
                                              ("fp8e4nv", 1, 2)):  # fmt: skip
        launch = (selection, centroids, variance_dims, args.head_dim, args.group, args.block_u,
                  not args.padded_rows)  # fmt: skip
        opcodes = count(score_kernel_sass(*launch, profile=profile,
                                          max_registers=args.max_registers))
        registers = re.search(r"REG:(\d+)", score_kernel_sass(
            *launch, resources=True, profile=profile, max_registers=args.max_registers))
        top = ", ".join(f"{name} {n}" for name, n in opcodes.most_common(8))
        variance = ("profile (compact)" if profile else
                    "diagonal" if variance_dims > 1 else "isotropic")  # fmt: skip
        rows.append(f"| {centroids} | {variance} | {sum(opcodes.values())} | "
                    f"{registers.group(1) if registers else '?'} | {top} |")  # fmt: skip
        print(rows[-1], flush=True)
    table = "\n".join([
        f"_score_units_kernel for sm_90, head_dim {args.head_dim}, group {args.group}, "
        f"{args.block_u} units a program, real rows {not args.padded_rows}, at most "
        f"{args.max_registers or 'any'} registers, 4 warps: SASS "
        f"instructions per thread (static count = issued per warp per program; no loops) and "
        f"registers a thread. `python benchmarks/sass_count.py`",
        "", "| centroids | variances | instructions | registers | most frequent |",
        "|---|---|---|---|---|", *rows, ""])  # fmt: skip
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
