"""Ahead-of-time compile check for every Triton kernel, without a GPU.

    python -m kernels.aot --arch 80,90 --json out.json [--kernel linear_scale,rope] [--dtype fp16]

Compiles every kernel × every config it can run with (the autotune lists, or the host-chosen ones) ×
fp16/bf16 × arch with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, then runs
the `ptxas-blackwell` bundled with Triton (`-v`) on the PTX to read registers, spill stores/loads and
static shared memory (Triton's own shared memory is dynamic: reported from the compile metadata).
Prints a markdown table, optionally writes it as JSON, and exits 1 on any compile error or spill.

The specialisations mirror what the JIT sees for LLaMA-sized calls: 16-byte aligned pointers,
unit inner strides (constexpr 1), 16-divisible sizes and row strides, the heaviest epilogue variant
(scale with row_to_seq, fused residual), head_dim 128, block_size 16, a GQA group.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; set to silence Triton's warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from . import gated_up, linear_scale, paged_attention, rms_norm, rope, rope_kv  # noqa: E402

DTYPES = ("fp16", "bf16")
PTXAS_FLAGS = ("-lineinfo", "--regAllocOptLevel=2")  # what Triton's own cubin step passes


@dataclass
class Variant:
    kernel: str
    fn: object
    config: triton.Config
    dtype: str
    ptrs: dict[str, str]  # pointer arg -> element type ("act" = the activation dtype)
    unit: tuple[str, ...] = ()  # int args specialised to 1 (constexpr), as the JIT does for unit strides
    div16: tuple[str, ...] = ()  # int args divisible by 16
    floats: tuple[str, ...] = ()
    constexprs: dict = field(default_factory=dict)
    label: str = ""

    def source(self):
        fn = self.fn
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise RuntimeError("kernels.aot needs compiled kernels: unset TRITON_INTERPRET")
        constexprs = {**self.constexprs, **self.config.kwargs, **{name: 1 for name in self.unit}}
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in self.ptrs:
                ty = self.ptrs[name]
                signature[name] = "*" + (self.dtype if ty == "act" else ty)
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in self.floats:
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if name in self.div16:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return triton.compiler.ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _cfg_label(config: triton.Config, extra: dict | None = None) -> str:
    kw = {**config.kwargs, **(extra or {})}
    parts = [f"{k.replace('BLOCK_', '')}={v}" for k, v in kw.items()]
    return " ".join(parts + [f"w{config.num_warps}", f"s{config.num_stages}"])


def variants(dtype: str) -> list[Variant]:
    out = []
    gemm_common = dict(
        unit=("stride_xk", "stride_sn", "stride_yn"),
        div16=("N", "K", "stride_xm", "stride_ss", "stride_ym"),
        constexprs={"HAS_SCALE": True, "HAS_ROW_TO_SEQ": True, "DOT_PRECISION": "ieee"},
    )
    for c in linear_scale.CONFIGS:
        out.append(
            Variant(
                "linear_scale",
                linear_scale.linear_scale_kernel,
                c,
                dtype,
                ptrs={"x_ptr": "act", "w_ptr": "act", "s_ptr": "act", "r2s_ptr": "i32", "y_ptr": "act"},
                unit=gemm_common["unit"] + ("stride_wk",),
                div16=gemm_common["div16"] + ("stride_wn",),
                constexprs=gemm_common["constexprs"],
                label=_cfg_label(c),
            )
        )
    for c in gated_up.CONFIGS:
        out.append(
            Variant(
                "gated_up",
                gated_up.gated_up_kernel,
                c,
                dtype,
                ptrs={
                    "x_ptr": "act",
                    "wg_ptr": "act",
                    "wu_ptr": "act",
                    "s_ptr": "act",
                    "r2s_ptr": "i32",
                    "y_ptr": "act",
                },
                unit=gemm_common["unit"] + ("stride_wgk", "stride_wuk"),
                div16=gemm_common["div16"] + ("stride_wgn", "stride_wun"),
                constexprs=gemm_common["constexprs"],
                label=_cfg_label(c),
            )
        )
    # rms_norm: the host picks 4 warps below BLOCK_D 4096 and 8 from there; compile each at its widest row
    for c, block in ((rms_norm.CONFIGS[0], 2048), (rms_norm.CONFIGS[1], 8192)):
        out.append(
            Variant(
                "rms_norm",
                rms_norm.rms_norm_kernel,
                c,
                dtype,
                ptrs={"x_ptr": "act", "r_ptr": "act", "w_ptr": "act", "y_ptr": "act", "h_ptr": "act"},
                div16=("D", "stride_x", "stride_r", "stride_y", "stride_h"),
                floats=("eps",),
                constexprs={"HAS_RESIDUAL": True, "BLOCK_D": block},
                label=_cfg_label(c, {"BLOCK_D": block}),
            )
        )
    for c in rope.CONFIGS:
        out.append(
            Variant(
                "rope",
                rope.rope_kernel,
                c,
                dtype,
                ptrs={"x_ptr": "act", "cs_ptr": "fp32", "y_ptr": "act"},
                unit=("stride_xd", "stride_cc"),
                div16=(
                    "HALF",
                    "stride_xb",
                    "stride_xt",
                    "stride_xh",
                    "stride_cb",
                    "stride_ct",
                    "stride_yb",
                    "stride_yt",
                    "stride_yh",
                ),
                constexprs={"BLOCK_HALF": 64},
                label=_cfg_label(c, {"HALF": 64}),
            )
        )
    for c in rope_kv.CONFIGS:
        out.append(
            Variant(
                "rope_write_kv",
                rope_kv.rope_write_kv_kernel,
                c,
                dtype,
                ptrs={
                    "x_ptr": "act",
                    "cs_ptr": "fp32",
                    "slot_ptr": "i64",
                    "q_ptr": "act",
                    "k_ptr": "act",
                    "v_ptr": "act",
                },
                div16=("HALF", "stride_xm", "stride_cm", "stride_qm", "stride_qh", "stride_ks", "stride_kh")
                + ("stride_vs", "stride_vh"),
                constexprs={"BLOCK_HALF": 64},
                label=_cfg_label(c, {"HALF": 64}),
            )
        )
    for c in paged_attention.CONFIGS:
        out.append(
            Variant(
                "paged_attention_decode",
                paged_attention.paged_attention_decode_kernel,
                c,
                dtype,
                ptrs={"q_ptr": "act", "k_ptr": "act", "v_ptr": "act", "bt_ptr": "i32", "sl_ptr": "i32", "o_ptr": "act"},
                div16=(
                    "HD",
                    "stride_qs",
                    "stride_qh",
                    "stride_kb",
                    "stride_kt",
                    "stride_kh",
                    "stride_vb",
                    "stride_vt",
                    "stride_vh",
                    "stride_os",
                    "stride_oh",
                ),
                floats=("qk_scale",),
                constexprs={"PAGE_SIZE": 16, "BLOCK_G": 16, "BLOCK_D": 128, "DOT_PRECISION": "ieee"},
                label=_cfg_label(c, {"page": 16, "hd": 128}),
            )
        )
    return out


def ptxas_path() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


def ptxas_stats(ptx: str) -> dict:
    """Run the bundled ptxas-blackwell -v on `ptx` (for the .target it names) and parse its report."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [str(ptxas_path()), "-v", *PTXAS_FLAGS, f"--gpu-name={target}", str(src), "-o", str(Path(d) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}):\n{log}")

    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    regs = num(r"Used (\d+) registers")
    return {
        "regs": regs,
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
        "smem_static": num(r"(\d+) bytes smem"),
        "ptxas_target": target,
    }


def compile_variant(args: tuple[str, int, int]) -> dict:
    dtype, index, arch = args  # picklable work item: the variant is rebuilt in the worker
    v = variants(dtype)[index]
    row = {"kernel": v.kernel, "config": v.label, "dtype": v.dtype, "arch": arch}
    t0 = time.perf_counter()
    try:
        opts = {"num_warps": v.config.num_warps, "num_stages": v.config.num_stages}
        k = triton.compile(v.source(), target=GPUTarget("cuda", arch, 32), options=opts)
        row.update(ptxas_stats(k.asm["ptx"]))
        row["shared"] = int(k.metadata.shared)
        row["error"] = None
    except Exception as e:  # report every failure, keep going
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def run(archs: list[int], kernels: list[str] | None = None, dtypes=DTYPES, jobs: int | None = None) -> list[dict]:
    work = [
        (d, i, a)
        for a in archs
        for d in dtypes
        for i, v in enumerate(variants(d))
        if not kernels or v.kernel in kernels
    ]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    if jobs <= 1:
        return [compile_variant(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_variant, work))


def table(rows: list[dict]) -> str:
    head = "| kernel | config | dtype | arch | regs | spill st/ld (B) | shared (B) | stack (B) | compile (s) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | sm_{r['arch']} | ERROR: {r['error']} ||||")
            continue
        lines.append(
            f"| {r['kernel']} | {r['config']} | {r['dtype']} | sm_{r['arch']} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared'] + r['smem_static']} | {r['stack']} | "
            f"{r['seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities, e.g. 80,90")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--kernel", help="comma-separated subset of kernels")
    p.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated subset of fp16,bf16")
    p.add_argument("--jobs", type=int, help="parallel compile processes (default: CPU count)")
    a = p.parse_args(argv)
    if not ptxas_path().exists():
        print(f"missing {ptxas_path()}", file=sys.stderr)
        return 2
    archs = [int(x) for x in a.arch.split(",")]
    kernels = a.kernel.split(",") if a.kernel else None
    t0 = time.perf_counter()
    rows = run(archs, kernels, tuple(a.dtype.split(",")), a.jobs)
    print(table(rows))
    bad = [r for r in rows if r["error"] or r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} compiles in {time.perf_counter() - t0:.1f} s; {len(bad)} with errors or spills")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
