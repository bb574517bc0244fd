"""Instructions per weight in the main loop of each decode GEMV, from its sm_90 SASS: no GPU needed.

    python benchmarks/decode_sass.py [--arch 90] [--mma] [--df11]

Compiles the bf16 GEMV (``bagel_rt.kernels.gemv``) and the compressed decode GEMVs
(``bagel_rt.quant.decode_gemv``) at their decode launch settings with ``triton.compile`` for a CUDA target
(ptxas and cuobjdump come with Triton), finds the loop (the last backward branch) and counts its instructions
by opcode. An SM issues 128 thread-instructions per clock, so instructions per weight bound the weights per
clock a GEMV can stream; compare with the bytes per clock its share of the memory bandwidth brings (H200:
~18 B per clock per SM). ``--mma`` adds the tensor-core GEMVs (``bagel_rt.quant.decode_mma``) at their settings.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import triton
from bagel_rt.quant import decode_gemv as dg
from bagel_rt.quant import decode_mma as dm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bagel_rt.bench import environment

bf16_gemv = importlib.import_module("bagel_rt.kernels.gemv")  # the module (the package exports the function)
df11 = importlib.import_module("bagel_rt.quant.df11_decode")  # likewise

# what Triton specializes at the decode shapes (multiples of 16)
DIVISIBLE = ("N", "K", "stride_xm", "stride_ym", "K_PER", "stride_yp")


def loop_ops(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> collections.Counter:
    # parameters left out take their defaults as constants (Triton 3.9 wants every parameter named)
    constexprs = {**{p.name: p.default for p in fn.params
                     if p.name not in signature and p.name not in constexprs and p.has_default}, **constexprs}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in DIVISIBLE}
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    cubin = Path(f"/tmp/decode_sass_{fn.__name__}.cubin")
    cubin.write_bytes(k.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    lines = [(int(a, 16), ins) for a, ins in re.findall(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?);", sass, re.M)]
    start = end = None
    for addr, ins in lines:
        m = re.search(r"BRA.*?(0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            start, end = int(m.group(1), 16), addr
    body = [re.sub(r"^@!?U?P\w+\s+", "", ins) for addr, ins in lines if start is not None and start <= addr <= end]
    return collections.Counter(ins.split()[0].split(".")[0] for ins in body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--mma", action="store_true", help="also the tensor-core GEMVs at each of their settings")
    ap.add_argument("--df11", action="store_true", help="also the DF11 decode loop (instructions per code)")
    ap.add_argument("--out", help="append one JSON line per kernel to this file")
    a = ap.parse_args()
    io = dict(N="i32", K="i32", stride_xm="i32", stride_ym="i32")
    q8 = {code: dict(x="*bf16", w="*i8" if code == "int8" else "*u8", s="*fp32", b="*fp32", y="*bf16", **io)
          for code in ("int8", "fp8", "fp8_native")}
    nf4 = dict(x="*bf16", p="*i32", a="*fp32", t="*fp32", pl="*i32", b="*fp32", y="*bf16", **io)
    cases = [("bf16", bf16_gemv._gemv_kernel, dict(x="*bf16", w="*bf16", b="*bf16", y="*bf16", **io),
              dict(HAS_BIAS=False, BN=2, BK=2048, USE_GDC=True), 8)]
    for code in ("int8", "fp8", "fp8_native"):
        cfg = dg.SETTINGS["gemv"]
        consts = dict(HAS_BIAS=False, CODE=code, BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True)
        cases.append((code, dg._q8_gemv_kernel, q8[code], consts, cfg["num_warps"]))
    # FP8 with packed bf16 products (words of 4 codes, bf16 x; BAGEL's K are multiples of BK: EVEN_K) at its
    # settings, GEMV and gate/up + SwiGLU, beside the fp32 products' gate/up + SwiGLU at theirs
    q8sw = dict(x="*bf16", wg="*u8", wu="*u8", sg="*fp32", su="*fp32", y="*bf16", **io)
    cfg = dg.SETTINGS["swiglu"]
    cases.append((f"fp8_native swiglu {cfg['BN']}x{cfg['BK']}/{cfg['num_warps']}", dg._q8_gemv_swiglu_kernel, q8sw,
                  dict(CODE="fp8_native", BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True), cfg["num_warps"]))
    # (INT8 too: the same loop with its own word decode)
    for code in ("fp8_native", "int8"):
        for kind, fn, sig, extra in (("", dg._q8_gemv_kernel, dict(q8[code], w="*i32"), dict(HAS_BIAS=False)),
                                     (" swiglu", dg._q8_gemv_swiglu_kernel, dict(q8sw, wg="*i32", wu="*i32"), {})):
            table = dg.INT8_HFMA_SETTINGS if code == "int8" else dg.FP8_HFMA_SETTINGS
            cfg = table[kind.strip() or "gemv"]
            consts = dict(extra, CODE=code, BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True, HFMA=True, EVEN_K=True)
            name = f"{code.split('_')[0]}{kind} hfma {cfg['BN']}x{cfg['BK']}/{cfg['num_warps']}"
            cases.append((name, fn, sig, consts, cfg["num_warps"]))
    cfg = dg.NF4_SETTINGS["gemv"]
    for wordwise in (False, True):
        consts = dict(HAS_BIAS=False, BLOCKSIZE=64, BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True, WORDWISE=wordwise)
        cases.append(("nf4 wordwise" if wordwise else "nf4", dg._nf4_gemv_kernel, nf4, consts, cfg["num_warps"]))
    # the byte-permute decodes (fp32 and packed bf16 products) at their settings beside the word-wise gather at the
    # same (GEMV, gate/up + SwiGLU)
    sw = dict(x="*bf16", pg="*i32", ag="*fp32", pu="*i32", au="*fp32", t="*fp32", pl="*i32", y="*bf16", **io)
    for kind, fn, sig, extra in (("", dg._nf4_gemv_kernel, nf4, dict(HAS_BIAS=False)),
                                 (" swiglu", dg._nf4_gemv_swiglu_kernel, sw, {})):
        for decode in ("wordwise", "prmt", "hfma"):
            table = dg.NF4_HFMA_SETTINGS if decode == "hfma" else dg.NF4_PRMT_SETTINGS
            cfg = table[kind.strip() or "gemv"]
            consts = dict(extra, BLOCKSIZE=64, BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True,
                          WORDWISE=decode == "wordwise", PRMT=decode == "prmt", HFMA=decode == "hfma",
                          EVEN_K=decode == "hfma")  # BAGEL's K are multiples of the hfma settings' BK
            name = f"nf4{kind} {decode} {cfg['BN']}x{cfg['BK']}/{cfg['num_warps']}"
            cases.append((name, fn, sig, consts, cfg["num_warps"]))
    # NF4's split-K candidate (fast_decode "triton-fsplit": fp32 parts, packed products) at its settings
    cfg = dict(dg.NF4_PARTS_SETTINGS)
    consts = dict(HAS_BIAS=False, BLOCKSIZE=64, BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True, HFMA=True, EVEN_K=True,
                  SPLIT=True)
    cases.append((f"nf4 split{cfg['parts']} hfma {cfg['BN']}x{cfg['BK']}/{cfg['num_warps']}", dg._nf4_gemv_kernel,
                  dict(nf4, y="*fp32", K_PER="i32", stride_yp="i32"), consts, cfg["num_warps"]))
    if a.mma:
        mio = dict(N="i32", K="i32", M="i32", stride_ym="i32")
        for fmt, code, wt, dt in (("int8", "int8", "*i8", "*i8"), ("fp8", "fp8_native", "*u8", "*fp16")):
            for width, cfg in dm.SETTINGS[fmt].items():
                sig = dict(dg=dt, un="*fp32", w=wt, s="*fp32", b="*fp32", y="*bf16", **mio)
                consts = dict(HAS_BIAS=False, CODE=code, BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True)
                if width == "split":  # the split-K variant: fp32 parts
                    sig.update(y="*fp32", K_PER="i32", stride_yp="i32")
                    consts["SPLIT"] = True
                cases.append((f"mma {fmt} {width}", dm._mma_gemv_kernel, sig, consts, cfg["num_warps"]))
        # the weights-first (wgmma) kernels: INT8 with its digits, FP8 undecoded against e4m3 digits
        for fmt, code, wt, dt in (("int8", "int8", "*i8", "*i8"), ("fp8", "e4m3", "*u8", "*u8")):
            for width, cfg in dm.WGMMA_SETTINGS.items():
                sig = dict(dg=dt, un="*fp32", w=wt, s="*fp32", b="*fp32", y="*bf16", **mio)
                consts = dict(HAS_BIAS=False, CODE=code, BN=cfg["BN"], BK=cfg["BK"], USE_GDC=True, W_A=True)
                if width == "split":
                    sig.update(y="*fp32", K_PER="i32", stride_yp="i32")
                    consts["SPLIT"] = True
                cases.append((f"wgmma {fmt} {width}", dm._mma_gemv_kernel, sig, consts, cfg["num_warps"]))
    if a.df11:  # the resident store's per-step decode (window counts given), with and without the joined level
        sig = dict(luts_ptr="*u8", codes_ptr="*u8", sm_ptr="*u8", pos_ptr="*i32", gaps_ptr="*u8", cnt_ptr="*u8",
                   first_ptr="*i32", out_ptr="*i16", n_luts="i32", n_bytes="i32", n_elements="i32",
                   n_gap_bytes="i32")
        for first, wide in ((False, False), (True, False), (True, True)):
            consts = dict(HAS_COUNTS=True, HAS_FIRST=first, THREADS=df11.THREADS_PER_BLOCK,
                          BYTES=df11.BYTES_PER_THREAD, WIDE=wide)
            cases.append((f"df11{' first' if first else ''}{' wide' if wide else ''}", df11._df11_decode_kernel,
                          sig, consts, df11.DECODE_WARPS))
    for name, fn, sig, consts, nw in cases:
        ops = loop_ops(fn, sig, consts, nw, a.arch)
        total = sum(ops.values())
        if "THREADS" in consts:  # the DF11 decode: one code per thread and iteration
            per, unit = total, "code"
            mem = {k: v for k, v in ops.items() if k in ("LDG", "STG", "LDS", "STS", "BAR")}
            print(f"{name:>16}: {total} loop instructions per code; {dict(ops.most_common(6))}; memory {mem}")
        else:
            # weights per thread and loop iteration (gate/up + SwiGLU: two weights' tiles)
            per_thread = consts["BN"] * consts["BK"] * (2 if "pg" in sig or "wg" in sig else 1) // (32 * nw)
            per, unit = total / per_thread, "weight"
            print(f"{name:>16}: {total} loop instructions / {per_thread} weights = {per:.2f} per weight; "
                  f"{dict(ops.most_common(8))}")
        if a.out:
            row = dict(diag="decode_sass", kernel=name, arch=f"sm_{a.arch}", num_warps=nw,
                       settings={k: v for k, v in consts.items() if k in ("BN", "BK")},
                       loop_instructions_per=unit, loop_instructions=round(per, 2), ops=dict(ops.most_common()),
                       command="python benchmarks/decode_sass.py " + " ".join(sys.argv[1:]), **environment())
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
