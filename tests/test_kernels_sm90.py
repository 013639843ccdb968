"""The decode step's kernels, the boundary band's paths among them, compiled for Hopper (sm_90)
without a GPU (Triton brings its own ptxas and cuobjdump): with pdl, each waits for the kernel
before it (griddepcontrol.wait, SASS ACQBULK) and lets the next one launch
(griddepcontrol.launch_dependents, PREEXIT) before its first load from global memory; without,
neither instruction is there. This is what makes select_rows(pdl=True) and
sparse_decode_balanced(pdl=True) safe to launch dependently; the equality of their results
runs in the kernel tests (on CUDA where there is one)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = {
    "selection": ["_score_units_kernel", "_exact_threshold_kernel", "_exact_list_kernel",
                  "_exact_units_kernel", "_walk_threshold_kernel", "_band_list_kernel",
                  "_band_tokens_kernel", "_mark_kernel", "_write_rows_kernel"],
    "decode_attention": ["_balanced_partial_kernel", "_balanced_merge_kernel"],
}  # fmt: skip


def launched_constants(tl) -> dict:
    """The kernels' constexpr arguments for a bf16 Llama-3.1-8B layer as select_rows and
    sparse_decode_balanced launch them (float8 centroids, per-dimension variances); tl:
    triton.language, imported where they compile."""
    return dict(
        GROUP=4, HEAD_DIM=128, SEGMENT=1024, CLUSTERS=64, BINS=2048, BLOCK_H=16, BLOCK_D=128,
        BLOCK_U=64, BLOCK_E=8, BLOCK_M=16, BLOCK_R=16, BLOCK_B=128, BLOCK_N=64, BLOCK_S=64,
        BLOCK_F=2, EXACT=True, ATTEND_TAIL=False, CLUSTERED_GIVEN=False, VARIANCE_DIMS=128,
        PROFILE=0, GROUP_PAD=4, DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32",
        VARIANCE_DOT_DTYPE=tl.float16, STREAM_EVICTION="",
        # the boundary band's paths (cluster_size=8,boundary_tokens=true,boundary_band=0.1)
        BAND=True, BAND_BINS=2, TAKE=True, STORE_LOG_MASS=True,
    )  # fmt: skip


POINTERS = dict(
    q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", centroids_ptr="*fp8e4nv",
    variances_ptr="*fp8e5", profiles_ptr="*fp16", mass_hist_ptr="*fp32", targets_ptr="*fp32",
    estimated_mass_ptr="*fp32", log_mass_ptr="*fp32", partial_out_ptr="*fp32",
    partial_lse_ptr="*fp32", unit_bin_ptr="*i16", forced_ptr="*i8", band_hist_ptr="*fp32",
    token_taken_ptr="*i8", member_bins_ptr="*i16",
)  # fmt: skip


def compiled_opcodes() -> dict:
    """{kernel: {"pdl" / "plain": its SASS opcodes for sm_90, in order}}: compiled where this
    file runs as a script, outside the tests' Triton interpreter (every pointer not named in
    POINTERS an int32 one)."""
    import triton.language as tl
    from tactic_server.kernels import decode_attention, selection

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sass_count import kernel_sass, opcodes

    modules = {"selection": selection, "decode_attention": decode_attention}
    constants = launched_constants(tl)
    result = {}
    for module, names in KERNELS.items():
        for name in names:
            kernel = getattr(modules[module], name)
            fixed = {p.name: constants[p.name] for p in kernel.params
                     if p.is_constexpr and p.name != "USE_PDL"}  # fmt: skip
            pointers = {p.name: POINTERS.get(p.name, "*i32") for p in kernel.params
                        if p.name.endswith("_ptr")}  # fmt: skip
            result[name] = {
                label: opcodes(kernel_sass(kernel, fixed | {"USE_PDL": pdl}, pointers, False))
                for label, pdl in (("pdl", True), ("plain", False))
            }
    return result


@functools.cache
def compiled() -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=environment, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("name", [n for names in KERNELS.values() for n in names])
def test_dependent_launch_waits_before_any_load(name):
    dependent, plain = compiled()[name]["pdl"], compiled()[name]["plain"]
    loads = [i for i, op in enumerate(dependent) if op.startswith(("LDG", "ATOMG", "RED"))]
    assert "ACQBULK" in dependent and "PREEXIT" in dependent
    assert loads and dependent.index("ACQBULK") < dependent.index("PREEXIT") < loads[0]
    assert "ACQBULK" not in plain and "PREEXIT" not in plain


if __name__ == "__main__":
    print(json.dumps(compiled_opcodes()))
