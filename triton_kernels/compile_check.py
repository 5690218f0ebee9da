"""Compile every kernel in every launch configuration the host wrappers can pick, for sm_80 and sm_90,
without a GPU, and report registers, spills and shared memory.

    python -m triton_kernels.compile_check            # table; exit 1 on a spill or a shared-memory overflow
    python -m triton_kernels.compile_check --arch 90  # one architecture
    python -m triton_kernels.compile_check --json rows.json
    python -m triton_kernels.compile_check --dtype fp32 --head-dim 256  # a subset (both repeatable)

The configurations come from the same functions the wrappers call (``block_config``, ``gram_config``) over
every head-dim bucket (``HEAD_DIMS``: 16..256) and input dtype, with the pointer dtypes each stage passes
(float32 split partials and key-summary output) and, for the launches that may split, both the
deterministic store and the atomic-add variant (``ATOMIC``, deterministic=False). Launches see unit inner
strides and 16-byte aligned pointers and never specialise sizes, head counts or the mask flag, so these are
the signatures they compile. Registers and spills come from ptxas -v on the generated PTX (the assembler
bundled with Triton), shared memory from Triton's metadata. Must run without TRITON_INTERPRET (interpreted
kernels cannot be compiled). Needs no GPU and no CUDA driver.
"""

from __future__ import annotations

import argparse
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


@dataclass(frozen=True)
class Launch:
    kernel: str
    stage: str             # the stages that launch it
    dtype: str             # input dtype (q, k, v, landmarks)
    pointer_dtypes: tuple  # ((pointer arg, dtype), ...) where it may differ from the input dtype
    constexprs: tuple      # ((name, value), ...)
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        blocks = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in self.constexprs if k.startswith("BLOCK"))
        wide = ",".join(f"{k}:{v}" for k, v in self.pointer_dtypes if v != self.dtype)
        precision = dict(self.constexprs)["PRECISION"] if self.dtype == "fp32" else ""
        atomic = " atomic" if dict(self.constexprs).get("ATOMIC") else ""
        return (f"{self.dtype} {blocks} w{self.num_warps}s{self.num_stages}" + (f" {precision}" if precision else "")
                + atomic + (f" [{wide}]" if wide else ""))


def _stage_launches(dtype: str, head_dims=None) -> list[Launch]:
    """What the stage wrappers launch for one input dtype: kernel, pointer dtypes, constexprs, warps.

    Pointer dtypes per stage (see gaussian_tiles' host wrappers): kernelized attention and the query apply
    write the forward output and dX in the input dtype; the key summary (split) writes float32 Z and dL
    partials; dY and dV always go through float32 partials. Values and output gradients always arrive in
    the input dtype (the key summary's float32 dZ is rescaled by a power of two and cast). The float32
    writes of split-capable launches also come as ATOMIC=True (deterministic=False).
    """
    from . import gaussian_tiles as gt

    f32 = "fp32"
    variants = {  # role -> [(stages, {pointer: dtype}, atomic)]
        "fwd": [("kernelized,query_apply", {"OUT": dtype}, False), ("key_summary", {"OUT": f32}, False),
                ("key_summary", {"OUT": f32}, True)],
        "rows": [("kernelized,query_apply", {"GRAD_X": dtype}, False), ("key_summary", {"GRAD_X": f32}, False),
                 ("key_summary", {"GRAD_X": f32}, True)],
        "keys": [("all", {"GRAD_Y": f32, "GRAD_V": f32}, False), ("all", {"GRAD_Y": f32, "GRAD_V": f32}, True)],
    }
    kernels = {"fwd": "gaussian_attention_fwd_kernel", "rows": "gaussian_attention_bwd_rows_kernel",
               "keys": "gaussian_attention_bwd_keys_kernel"}
    launches = {}
    for block_d in head_dims or gt.HEAD_DIMS:
        for role in gt.KERNEL_ROLES:
            cfg = gt.block_config(role, block_d, DTYPES[dtype])
            for stages, pointers, atomic in variants[role]:
                consts = (("BLOCK_R", cfg["BLOCK_R"]), ("BLOCK_K", cfg["BLOCK_K"]), ("BLOCK_D", block_d),
                          ("BLOCK_DV", block_d), ("UPCAST", False), ("PRECISION", cfg["PRECISION"]),
                          ("ATOMIC", atomic))
                key = (kernels[role], tuple(sorted(pointers.items())), consts)
                if key in launches:  # float32 inputs: the two variants coincide
                    stages = launches[key].stage + "," + stages
                launches[key] = Launch(kernels[role], stages, dtype, key[1], consts, cfg["num_warps"],
                                       cfg["num_stages"])
        gram = gt.gram_config(block_d, DTYPES[dtype])
        consts = (("BLOCK", gram["BLOCK"]), ("BLOCK_D", block_d), ("UPCAST", False),
                  ("PRECISION", gram["PRECISION"]))
        for kernel, pointers in (("landmark_gram_kernel", (("OUT", f32),)),
                                 ("landmark_gram_bwd_kernel", (("GRAD_M", f32),))):
            launches[(kernel, consts)] = Launch(kernel, "gram", dtype, pointers, consts, gram["num_warps"],
                                      gram["num_stages"])
    return list(launches.values())


def launches(dtypes=None, head_dims=None) -> list[Launch]:
    """Every launch (or those of the given input dtypes / head-dim buckets)."""
    return [launch for dtype in dtypes or DTYPES for launch in _stage_launches(dtype, head_dims)]


_UNIT_STRIDES = re.compile(r"^s\w+_(d|c)$|^sm_r$")  # innermost strides: 1 for contiguous inputs
_FLOATS = {"scale", "scale_log2"}


def _source(launch: Launch):
    from triton.compiler import ASTSource

    from . import gaussian_tiles as gt

    fn = getattr(gt, launch.kernel)
    constexprs = dict(launch.constexprs)
    pointer_dtypes = dict(launch.pointer_dtypes)
    signature, attrs, values = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[name] = constexprs[name]
        elif name.isupper():
            dtype = "u8" if name == "MASK" else pointer_dtypes.get(name, launch.dtype)
            signature[name] = f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif _UNIT_STRIDES.match(name):
            signature[name] = "constexpr"
            values[name] = 1
        else:
            signature[name] = "i32"
            if name not in gt.RUNTIME_INTS:  # other strides, head dims, split lengths: multiples of 16
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
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    shared = int(compiled.metadata.shared)
    return dict(kernel=launch.kernel, stage=launch.stage, config=launch.describe(), arch=arch,
                registers=registers, spills=spills, shared=shared,
                ok=spills == 0 and shared <= SHARED_LIMIT[arch])


def run(archs=(80, 90), workers: int | None = None, dtypes=None, head_dims=None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (interpreted kernels cannot compile)")
    jobs = [(launch, arch) for arch in archs for launch in launches(dtypes, head_dims)]
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
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    from .gaussian_tiles import HEAD_DIMS

    if any(d not in HEAD_DIMS for d in args.head_dim or ()):
        parser.error(f"--head-dim must be one of {list(HEAD_DIMS)}")
    rows = run(tuple(args.arch or SHARED_LIMIT), args.workers, args.dtype, args.head_dim)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failures = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows)} compiles, {len(failures)} failing (spills > 0 or shared memory over the arch limit)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
