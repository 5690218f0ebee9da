"""Compile every kernel in every launch configuration the host wrappers can pick, for sm_80 and sm_90,
without a GPU, and report registers, spills and shared memory.

    python -m triton_kernels.compile_check            # table; exit 1 on a spill or a shared-memory overflow
    python -m triton_kernels.compile_check --arch 90  # one architecture
    python -m triton_kernels.compile_check --json rows.json
    python -m triton_kernels.compile_check --dtype fp32 --head-dim 256  # a subset (both repeatable)
    python -m triton_kernels.compile_check --kernel newton_schulz --m-pad 256  # the landmark solve, m <= 256

The configurations come from the same functions the wrappers call (``block_candidates``: every autotuning
candidate of the generic kernels; ``landmark_solve.solve_config``, ``cholesky_config``) over every head-dim
bucket (``HEAD_DIMS``: 16..256), input dtype and, for the landmark solve, landmark-count bucket (``M_PADS``:
16..256), with the pointer dtypes each stage passes (float32 split partials and key-summary output) and, for
the launches that may split, both the deterministic store and the atomic-add variant (``ATOMIC``,
deterministic=False), the key summary's scaled output gradient (``SCALED_GRAD``), the landmark kernels
(``landmarks``: every landmark-count bucket up to ``MAX_LANDMARKS`` and landmark source) and the landmark
refinement's kernels (``landmark_refine``: every head-dim and landmark-count bucket). Packed (varlen) calls
compile their own variants of the same kernels (``X_PACKED`` / ``Y_PACKED``, ``PACKED``; int32 cu_seqlens
pointers), checked here beside the dense ones. Signatures: unit
inner strides, 16-byte aligned pointers, other strides and head dims taken as multiples of 16 (the usual
shapes; other values compile the same code without that alignment hint), arguments a kernel does not
specialise (its ``do_not_specialize``) as plain ints, and the specialised counts that take any value
(``Launch.int_values``) as 1 and as a plain int. Registers and spills come from ptxas -v on the generated PTX
(the assembler bundled with Triton), shared memory from Triton's metadata. Must run without TRITON_INTERPRET
(interpreted kernels cannot be compiled). Needs no GPU and no CUDA driver.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block
DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class Launch:
    kernel: str
    stage: str             # the stages that launch it
    dtype: str             # input dtype (q, k, v, landmarks)
    pointer_dtypes: tuple  # ((pointer arg, dtype), ...) where it may differ from the input dtype
    constexprs: tuple      # ((name, value), ...)
    num_warps: int
    num_stages: int
    module: str = "gaussian_tiles"  # the triton_kernels module defining the kernel
    # Specialised integer arguments whose runtime value picks the compiled variant: ((name, value), ...) with
    # 1 (compiled as the constant 1) or None (any other value: no divisibility hint).
    int_values: tuple = ()
    maxnreg: int | None = None  # ptxas register cap (the kernel's launch option), None: Triton's default

    def describe(self) -> str:
        blocks = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in self.constexprs if "BLOCK" in k)
        wide = ",".join(f"{k}:{v}" for k, v in self.pointer_dtypes if v != self.dtype)
        # The landmark solve's iteration multiplies float32 workspace matrices whatever the input dtype.
        float32_dots = self.dtype == "fp32" or self.module == "landmark_solve"
        precision = dict(self.constexprs).get("PRECISION", "") if float32_dots else ""
        flags = "".join(f" {flag}" for flag, name in (("atomic", "ATOMIC"), ("scaled", "SCALED_GRAD"),
                                                      ("packed-x", "X_PACKED"), ("packed-y", "Y_PACKED"),
                                                      ("packed", "PACKED")) if dict(self.constexprs).get(name))
        source = f" source={dict(self.constexprs)['SOURCE']}" if "SOURCE" in dict(self.constexprs) else ""
        ints = "".join(f" {name}={'*' if value is None else value}" for name, value in self.int_values)
        registers = f"r{self.maxnreg}" if self.maxnreg else ""
        return (f"{self.dtype} {blocks} w{self.num_warps}s{self.num_stages}{registers}" + (f" {precision}" if precision else "")
                + flags + source + ints + (f" [{wide}]" if wide else ""))


def _stage_launches(dtype: str, head_dims=None) -> list[Launch]:
    """What the stage wrappers launch for one input dtype: kernel, pointer dtypes, constexprs, warps, for
    every autotuning candidate (``block_candidates``) of the three generic kernels.

    Pointer dtypes per stage (see gaussian_tiles' host wrappers and the stage modules): kernelized attention
    and the query apply write the forward output and dX in the input dtype, dY and dV as float32 split
    partials; the key summary writes float32 Z and dL partials and, its m landmark rows never split, dK and dV
    in the input dtype. Its output gradient arrives scaled (SCALED_GRAD, float32 factors in GRAD_FACTOR);
    elsewhere GRAD_FACTOR is an unread placeholder, the output gradient itself. The float32 writes of
    launches that split also come as ATOMIC=True (deterministic=False).
    """
    from . import gaussian_tiles as gt

    f32 = "fp32"
    dense = {  # role -> [(stages, {pointer: dtype}, atomic, scaled gradient)]
        "fwd": [("kernelized,query_apply", {"OUT": dtype}, False, False),
                ("key_summary", {"OUT": f32}, False, False), ("key_summary", {"OUT": f32}, True, False)],
        "rows": [("kernelized,query_apply", {"GRAD_X": dtype}, False, False),
                 ("key_summary", {"GRAD_X": f32, "GRAD_FACTOR": f32}, False, True),
                 ("key_summary", {"GRAD_X": f32, "GRAD_FACTOR": f32}, True, True)],
        "keys": [("kernelized,query_apply", {"GRAD_Y": f32, "GRAD_V": f32}, False, False),
                 ("kernelized,query_apply", {"GRAD_Y": f32, "GRAD_V": f32}, True, False),
                 ("key_summary", {"GRAD_Y": dtype, "GRAD_V": dtype, "GRAD_FACTOR": f32}, False, True)],
    }
    # Packed sequences (X_PACKED, Y_PACKED): the query apply packs X, the key summary Y, kernelized both.
    packing = {"query_apply": (True, False), "key_summary": (False, True), "kernelized": (True, True)}
    variants = {role: [(stages, pointers, atomic, scaled, (False, False))
                       for stages, pointers, atomic, scaled in entries]
                + [(stage, pointers, atomic, scaled, packing[stage])
                   for stages, pointers, atomic, scaled in entries for stage in stages.split(",")]
                for role, entries in dense.items()}
    kernels = {"fwd": "gaussian_attention_fwd_kernel", "rows": "gaussian_attention_bwd_rows_kernel",
               "keys": "gaussian_attention_bwd_keys_kernel"}
    launches = {}
    for block_d in head_dims or gt.HEAD_DIMS:
        for role in gt.KERNEL_ROLES:
            for cfg in gt.block_candidates(role, block_d, DTYPES[dtype]):
                for stages, pointers, atomic, scaled, (x_packed, y_packed) in variants[role]:
                    consts = (("BLOCK_R", cfg["BLOCK_R"]), ("BLOCK_K", cfg["BLOCK_K"]), ("BLOCK_D", block_d),
                              ("BLOCK_DV", block_d), ("UPCAST", False), ("PRECISION", cfg["PRECISION"]),
                              ("ATOMIC", atomic)) + ((("SCALED_GRAD", scaled),) if role != "fwd" else ()) + (
                        ("X_PACKED", x_packed), ("Y_PACKED", y_packed))
                    key = (kernels[role], tuple(sorted(pointers.items())), consts, cfg["num_warps"],
                           cfg["num_stages"])
                    if key in launches:  # float32 inputs: the stages' pointer dtypes coincide
                        stages = launches[key].stage + "," + stages
                    launches[key] = Launch(kernels[role], stages, dtype, key[1], consts, cfg["num_warps"],
                                           cfg["num_stages"],
                                           maxnreg=gt.register_cap(DTYPES[dtype], block_d, x_packed, y_packed))
    return list(launches.values())


def _landmark_launches(dtype: str, head_dims=None, m_pads=None) -> list[Launch]:
    """The landmark stage's two kernels (``landmarks.forward`` / ``backward_into``) for one input dtype.

    Rows kernel: every landmark-count bucket (BLOCK_M, 16..MAX_LANDMARKS) and source: given indices (int64
    or int32; DRAWS is then the int64 index output as a placeholder), float64 draws, the strided grid (both
    placeholders int64). n_q and n_k are specialised by Triton but take any value. Scatter kernel:
    every head-dim bucket, float32 dL parts; its split counts are 1 (no split, or atomic partials) or any
    other value, each a compiled variant of its own.
    """
    from . import gaussian_tiles as gt
    from . import landmarks as lm

    i64 = "i64"
    launches = []
    m_blocks = [16 << i for i in range((lm.MAX_LANDMARKS // 16).bit_length())]  # BLOCK_M: 16..MAX_LANDMARKS
    sources = [(lm.SOURCE_GIVEN, (("DRAWS", i64), ("INDICES_IN", i64))),
               (lm.SOURCE_GIVEN, (("DRAWS", i64), ("INDICES_IN", "i32"))),
               (lm.SOURCE_DRAWS, (("DRAWS", "fp64"), ("INDICES_IN", i64))),
               (lm.SOURCE_STRIDED, (("DRAWS", i64), ("INDICES_IN", i64)))]
    any_value = (("n_q", None), ("n_k", None))
    for block_m in m_pads or m_blocks:
        for (source, pointers), packed in itertools.product(sources, (False, True)):
            cfg = lm.rows_config(block_m)
            consts = (("SOURCE", source.value), ("BLOCK_M", block_m), ("BLOCK_N", cfg["BLOCK_N"]),
                      ("BLOCK_D", cfg["BLOCK_D"]), ("PACKED", packed))
            launches.append(Launch("landmark_rows_kernel", "landmarks", dtype, pointers + (("INDICES_OUT", i64),),
                                   consts, cfg["num_warps"], 3, "landmarks", any_value, cfg["maxnreg"]))
    f32 = "fp32"
    pointers = (("COUNTS", f32), ("GRAD_KS", f32), ("GRAD_QA", f32), ("GRAD_SOLVE", f32), ("GRAD_TOTAL", f32),
                ("INDICES", i64))
    for block_d in head_dims or gt.HEAD_DIMS:
        for query_splits, key_splits, packed in itertools.product((1, None), (1, None), (False, True)):
            launches.append(Launch("landmark_grad_scatter_kernel", "landmarks", dtype, pointers,
                                   (("BLOCK_D", block_d), ("BLOCK_N", lm.SCATTER_MASK_BLOCK), ("PACKED", packed)),
                                   4, 3, "landmarks", (("n_q", None), ("n_k", None), ("query_splits", query_splits),
                                                       ("key_splits", key_splits)), lm.SCATTER_MAX_REGISTERS))
    return launches


def _refine_launches(dtype: str, head_dims=None, m_pads=None) -> list[Launch]:
    """The landmark refinement's three kernels (``landmark_refine.forward`` / ``backward_into``) for one input
    dtype over the head-dim and landmark-count buckets, with ``refine_config``'s tiles: float32 sums, counts
    and dL, int32 assignments."""
    from . import gaussian_tiles as gt
    from . import landmark_refine as lr
    from . import landmark_solve as ls

    f32, i32 = "fp32", "i32"
    launches = []
    for block_d in head_dims or gt.HEAD_DIMS:
        for m_pad in m_pads or ls.M_PADS:
            for packed in (False, True):  # packed: the assignments' batch stride is the row stride 1
                cfg = lr.refine_config(m_pad, block_d, DTYPES[dtype])
                blocks = (("BLOCK_M", cfg["BLOCK_M"]), ("CHUNK_D", cfg["CHUNK_D"]))
                flag, ints = (("PACKED", packed),), ((("sa_b", 1),) if packed else ())
                launches += [
                    Launch("lloyd_assign_kernel", "refine", dtype, (("ASSIGN", i32), ("COUNTS", f32), ("SUMS", f32)),
                           (("BLOCK_N", cfg["BLOCK_N"]),) + blocks + (("UPCAST", False),
                                                                     ("PRECISION", cfg["PRECISION"])) + flag,
                           cfg["num_warps"], 3, "landmark_refine", ints, lr.ASSIGN_MAX_REGISTERS),
                    Launch("lloyd_update_kernel", "refine", dtype,
                           (("COUNTS", f32), ("COUNTS_OUT", f32), ("SUMS", f32)),
                           blocks + (("MASK_BLOCK", lr.MASK_BLOCK),) + flag, 4, 3, "landmark_refine"),
                    Launch("lloyd_grad_kernel", "refine", dtype, (("ASSIGN", i32), ("COUNTS", f32), ("GRAD_L", f32)),
                           (("BLOCK_N", cfg["GRAD_BLOCK_N"]), ("CHUNK_D", cfg["GRAD_CHUNK_D"])) + flag, 4, 3,
                           "landmark_refine", ints,
                           lr.PACKED_GRAD_MAX_REGISTERS if packed else lr.GRAD_MAX_REGISTERS),
                ]
    return launches


def _solve_launches(dtype: str, head_dims=None, m_pads=None) -> list[Launch]:
    """The landmark solve's kernels (Newton-Schulz and Cholesky) for one input dtype over the head-dim and
    landmark-count buckets. Landmarks, Y and the scaled dZ are in the input dtype (dZ also float32: context
    parallel); partials, Z, f, dL and the workspace float32, the Cholesky status int32."""
    import torch

    from . import gaussian_tiles as gt
    from . import landmark_solve as ls

    f32 = "fp32"
    forward = (("WS", f32), ("Y", dtype), ("Z", f32), ("Z_PARTIALS", f32))
    backward = (("GRAD_FACTOR", f32), ("GRAD_L", f32), ("GRAD_PARTIALS", f32), ("GRAD_Z", dtype), ("WS", f32),
                ("Z", f32))
    # Context-parallel calls take the scaled dZ in float32 (summed over the ranks before it is rounded).
    backward_float32 = tuple((name, f32 if name == "GRAD_Z" else kind) for name, kind in backward)
    kernels = [  # (kernel, its config function, pointer dtypes)
        ("newton_schulz_fwd_kernel", ls.solve_config, forward),
        ("newton_schulz_bwd_kernel", ls.solve_config, backward),
        ("newton_schulz_bwd_kernel", ls.solve_config, backward_float32),
        ("cholesky_fwd_kernel", ls.cholesky_config, forward + (("STATUS", "i32"),)),
        ("cholesky_bwd_kernel", ls.cholesky_config, backward),
        ("cholesky_bwd_kernel", ls.cholesky_config, backward_float32),
    ]
    launches = {}
    for block_d in head_dims or gt.HEAD_DIMS:
        for m_pad in m_pads or ls.M_PADS:
            for kernel, config, kernel_pointers in kernels:  # m buckets with one config compile once
                cfg = config(m_pad, block_d, getattr(torch, TORCH_DTYPES[dtype]))
                consts = (("BLOCK", cfg["BLOCK"]), ("GRAM_BLOCK", cfg["GRAM_BLOCK"]), ("BLOCK_D", cfg["BLOCK_D"]),
                          ("UPCAST", False), ("PRECISION", cfg["PRECISION"]),
                          ("GRAM_PRECISION", cfg["GRAM_PRECISION"]))
                launches[(kernel, kernel_pointers, consts, cfg["num_warps"], cfg["num_stages"])] = Launch(
                    kernel, "solve", dtype, kernel_pointers, consts, cfg["num_warps"], cfg["num_stages"],
                    "landmark_solve", maxnreg=cfg["maxnreg"])
    return list(launches.values())


def launches(dtypes=None, head_dims=None, m_pads=None, kernels=None) -> list[Launch]:
    """Every launch (or those of the given input dtypes / head-dim buckets / landmark-count buckets of the
    solve / kernels whose name contains one of `kernels`)."""
    every = [launch for dtype in dtypes or DTYPES
             for launch in (_stage_launches(dtype, head_dims) + _solve_launches(dtype, head_dims, m_pads)
                            + _landmark_launches(dtype, head_dims, m_pads) + _refine_launches(dtype, head_dims, m_pads))]
    # Buckets that pick the same configuration (e.g. the refine kernels' m buckets) compile once.
    return list(dict.fromkeys(launch for launch in every if not kernels or any(k in launch.kernel for k in kernels)))


_UNIT_STRIDES = re.compile(r"^s\w+_(d|c)$|^sm_r$")  # innermost strides: 1 for contiguous inputs
_FLOATS = {"scale", "scale_log2", "ridge"}


def _source(launch: Launch):
    import importlib

    from triton.compiler import ASTSource

    module = importlib.import_module(f"{__package__}.{launch.module}")
    fn = getattr(module, launch.kernel)
    constexprs = dict(launch.constexprs)
    pointer_dtypes = dict(launch.pointer_dtypes)
    signature, attrs, values = {}, {}, {}
    int_values = dict(launch.int_values)
    unspecialised = {param.name for param in fn.params if param.do_not_specialize}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[name] = constexprs[name]
        elif name.isupper():
            dtype = "u8" if name == "MASK" else "i32" if name.startswith("CU_") else pointer_dtypes.get(
                name, launch.dtype)
            signature[name] = f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif _UNIT_STRIDES.match(name):
            signature[name] = "constexpr"
            values[name] = 1
        elif name in int_values and name not in unspecialised and int_values[name] == 1:
            signature[name] = "constexpr"  # Triton compiles an argument equal to 1 as the constant
            values[name] = 1
        else:
            signature[name] = "i32"
            if name not in unspecialised and name not in int_values:  # strides, head dims, split lengths
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) from ptxas -v, the same assembler Triton uses."""
    import triton.backends.nvidia as nvidia

    ptxas = os.environ.get("TRITON_PTXAS_PATH") or str(Path(nvidia.__file__).parent / "bin" / "ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                                capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_one(job: tuple[Launch, int]) -> dict:
    launch, arch = job
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages,
                                           **({"maxnreg": launch.maxnreg} if launch.maxnreg else {})))
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    shared = int(compiled.metadata.shared)
    return dict(kernel=launch.kernel, stage=launch.stage, config=launch.describe(), arch=arch,
                registers=registers, spills=spills, shared=shared,
                ok=spills == 0 and shared <= SHARED_LIMIT[arch])


def run(archs=(80, 90), workers: int | None = None, dtypes=None, head_dims=None, m_pads=None,
        kernels=None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (interpreted kernels cannot compile)")
    jobs = [(launch, arch) for arch in archs for launch in launches(dtypes, head_dims, m_pads, kernels)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, jobs))


def format_table(rows: list[dict]) -> str:
    header = f"{'kernel':36} {'stage':12} {'sm':>3} {'config':58} {'regs':>4} {'spill':>5} {'smem':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['kernel']:36} {r['stage']:12} {r['arch']:>3} {r['config']:58} {r['registers']:>4} "
                     f"{r['spills']:>5} {r['shared']:>7}" + ("" if r["ok"] else "  <-- FAIL"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability (repeatable); default: 80 and 90")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="input dtype (repeatable)")
    parser.add_argument("--head-dim", type=int, action="append", help="head-dim bucket (repeatable)")
    parser.add_argument("--m-pad", type=int, action="append",
                        help="landmark-count bucket of the landmark solve kernels (repeatable)")
    parser.add_argument("--kernel", action="append", help="kernels whose name contains this (repeatable)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    from .gaussian_tiles import HEAD_DIMS
    from .landmark_solve import M_PADS

    if any(d not in HEAD_DIMS for d in args.head_dim or ()):
        parser.error(f"--head-dim must be one of {list(HEAD_DIMS)}")
    if any(m not in M_PADS for m in args.m_pad or ()):
        parser.error(f"--m-pad must be one of {list(M_PADS)}")
    rows = run(tuple(args.arch or SHARED_LIMIT), args.workers, args.dtype, args.head_dim, args.m_pad, args.kernel)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failures = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows)} compiles, {len(failures)} failing (spills > 0 or shared memory over the arch limit)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
