#!/usr/bin/env bash
# The GPU measurements that issue 12's prepared candidates still wait for, most valuable first, each part
# sized for one `device` call (under 10 minutes; rows go to $OUT, then into benchmarks/results/*_h200.jsonl).
#
#   bash benchmarks/pending_ab.sh COMMIT PART
#     decode  the decode A/B of "triton" (packed bf16 products for NF4, INT8 and FP8) against the fp32 products
#             it replaced (triton-fp32) and the alternatives: INT8 / FP8 down split-K on the FMA kernels
#             (triton-fsplit; NF4's down always is), every INT8 / FP8 weight on the FMA kernels (triton-fma), the L2 prefetch
#             (triton-prefetch); then the GPU tests of those kernels
#     wgmma   the weights-first tensor-core GEMVs (decode_mma.wgmma_on): the GPU tests, then the decode A/B of
#             "triton" against "triton-wgmma", "triton-wgmma-split" and "triton-fp32"
#     wkernels the weights-first GEMVs' launch settings beside today's kernels (CUDA-graph replay)
#     lean    "triton" against "triton-fp32", "triton-fsplit" and "triton-fma", and the packed products' and
#             split-K GPU tests (a call with ~5 minutes of device time left)
#     df11    DF11 t2i under a 24 GiB budget, the Exp4 resident form, then the Huffman one (each with its bf16
#             run in the same process: vs_bf16, bit_identical)
#     kernels the decode GEMVs' candidate settings (CUDA-graph replay), the DF11 decode kernels
#     budget  FP8 t2i and the FP8-gen/NF4-und t2i uncapped, then under their card budgets (15.5, 12 GiB), with
#             each phase's seconds and peaks (where the budget's extra seconds go), and with the denoiser released
#             before each VAE decode (+drop, the behaviour before placement.vae_fits)
#     budget-few the most wanted of both, for a call with little device time
#     targets issue 12's budget targets alone (FP8 t2i / edit under 15.5 GiB, the 12 GB recipe, the FP8 uncapped
#             runs for their ratios), ~5 minutes
#     caps    INT8 under 16 GiB and NF4 under 12 beside bf16 in one process (vs_bf16, t2i and edit): the chunk
#             rule of df405e2 gives them fewer chunks and a kept denoiser, not yet measured (~7 minutes)
#     budget-edit the FP8 edit under 15.5 GiB with the arena's shared prefix (bagel_rt.arena) and placement's chunks,
#             without the sharing (+copied), with 4 chunks as before, and uncapped (~8 minutes)
#     store   the cache store and one-layer arenas (bagel_rt.arena) against the arena with every layer's query blocks
#             (+layered), uncapped and under 15.5 GiB, then the FP8 / 12 GB recipe budget targets (~6 minutes)
#
# Winners become the defaults with the measurement in the code comment beside them (decode_gemv settings,
# fast_decode.DEFAULT_GEMV, df11_resident.DEFAULT_FORM), and the README's issue-12 paragraphs get the rows.
set -uo pipefail
c=${1:?commit}; part=${2:?part}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
out=${OUT:-/tmp}
t0=$(date +%s)
case "$part" in
  decode)
    # most wanted first (a timeout keeps the rows written before it); variants that leave a format's kernels as
    # they are skip it (fast_decode.VARIANT_FORMATS)
    timeout 380 python3 benchmarks/compressed_speed.py --formats bf16,nf4,int8,fp8 --tasks decode \
      --decode-gemvs triton,triton-fsplit,triton-fp32,triton-fma,triton-prefetch \
      --commit "$c" \
      --out "$out/compressed.jsonl" 2>&1 | grep -v -i warn | tail -n 24
    echo "decode $(( $(date +%s) - t0 )) s"
    timeout 170 python3 -m pytest -q -m gpu -s tests/test_decode_gemv.py tests/test_quant_kernels.py \
      tests/test_fast_decode.py -k "exp4 or prmt or hfma or nf4_decodes or prefetch or parts" 2>&1 \
      | grep -E "passed|failed|FAIL|Error|hfma|assert" | tail -n 25
    echo "tests $(( $(date +%s) - t0 )) s" ;;
  wgmma)  # the weights-first tensor-core GEMVs: their GPU tests, then the decode A/B against "triton"
    timeout 230 python3 -m pytest -q -m gpu tests/test_decode_mma.py tests/test_fast_decode.py \
      tests/test_decode_gemv.py tests/test_placement.py 2>&1 | grep -E "passed|failed|FAIL|Error|assert" | tail -n 20
    echo "tests $(( $(date +%s) - t0 )) s"
    timeout 330 python3 benchmarks/compressed_speed.py --formats bf16,int8,fp8,nf4 --tasks decode \
      --decode-gemvs triton,triton-wgmma,triton-wgmma-split,triton-fp32 --commit "$c" \
      --out "$out/compressed.jsonl" 2>&1 | grep -v -i warn | tail -n 16
    echo "decode $(( $(date +%s) - t0 )) s" ;;
  wkernels)  # their launch settings (CUDA-graph replay) beside today's tensor-core and FMA kernels
    timeout 560 python3 benchmarks/bench_kernels.py --only qgemv --graph --no-compile --providers wgmma,wsplit,=mma \
      --commit "$c" --out "$out/kernels.jsonl" 2>&1 | grep -v -i warn | head -n 150 ;;
  lean)  # the default against the fp32 products, for a call with little device time left (~5 minutes)
    timeout 290 python3 benchmarks/compressed_speed.py --formats bf16,nf4,int8,fp8 --tasks decode \
      --decode-gemvs triton,triton-fsplit,triton-fp32,triton-fma --commit "$c" \
      --out "$out/compressed.jsonl" 2>&1 | grep -v -i warn | tail -n 16
    echo "decode $(( $(date +%s) - t0 )) s"
    timeout 110 python3 -m pytest -q -m gpu -s tests/test_decode_gemv.py tests/test_fast_decode.py \
      -k "hfma or greedy_matches_torch_bf16 or parts" 2>&1 \
      | grep -E "passed|failed|FAIL|Error|hfma|assert" | tail -n 20
    echo "tests $(( $(date +%s) - t0 )) s" ;;
  df11)
    timeout 300 python3 benchmarks/budget_memory.py --df11-form exp4 --runs df11@24:t2i --commit "$c" \
      --out "$out/budget.jsonl" 2>&1 | tail -n 8
    echo "df11 exp4 $(( $(date +%s) - t0 )) s"
    timeout 250 python3 benchmarks/budget_memory.py --df11-form huffman --runs df11@24:t2i --commit "$c" \
      --out "$out/budget.jsonl" \
      2>&1 | tail -n 6
    echo "df11 huffman $(( $(date +%s) - t0 )) s" ;;
  kernels)
    timeout 420 python3 benchmarks/bench_kernels.py --only qgemv --graph --no-compile --providers hfma,prmt,fsplit \
      --commit "$c" --out "$out/kernels.jsonl" 2>&1 | head -n 120
    timeout 120 python3 benchmarks/bench_kernels.py --only df11 --commit "$c" --out "$out/kernels.jsonl" 2>&1 \
      | tail -n 10 ;;
  budget)  # t2i: FP8 under 15.5 GiB, the FP8-gen/NF4-und recipe under 12, each beside its uncapped run and
    # with the denoiser released before the VAE decode (+drop: captured again by every request, as before)
    timeout 560 python3 benchmarks/budget_memory.py --commit "$c" --out "$out/budget.jsonl" \
      --runs fp8:t2i,fp8@15.5:t2i,fp8@15.5:t2i+drop,fp8-gen-nf4-und:t2i,fp8-gen-nf4-und@12:t2i,fp8-gen-nf4-und@12:t2i+drop 2>&1 \
      | grep -v -i warn | tail -n 18 ;;
  budget-few)  # the most wanted budget rows first, for a call with little device time (rows kept on a timeout)
    timeout 520 python3 benchmarks/budget_memory.py --commit "$c" --out "$out/budget.jsonl" \
      --runs fp8@15.5:t2i,fp8@15.5:t2i+drop,fp8@15.5:edit,fp8-gen-nf4-und@12:t2i,fp8:edit,fp8:t2i 2>&1 \
      | grep -v -i warn | tail -n 14 ;;
  targets)  # issue 12's budget targets alone (FP8 t2i / edit under 15.5 GiB, the 12 GB recipe), ~5 minutes
    # (the first run of a fresh machine is slow: the FP8 t2i twice; the uncapped runs for the ratios)
    timeout 330 python3 benchmarks/budget_memory.py --commit "$c" --out "$out/budget.jsonl" \
      --runs fp8@15.5:t2i,fp8@15.5:t2i,fp8@15.5:edit,fp8-gen-nf4-und@12:t2i,fp8:t2i,fp8:edit 2>&1 | grep -v -i warn \
      | grep -o '"weights": "[^"]*"\|"budget_gib": [0-9.a-z]*\|"task": "[a-z0-9]*"\|"seconds": [0-9.]*\|"peak_gib": [0-9.]*' \
      | paste - - - - - ;;
  caps)  # the weight-only formats under their card budgets, each beside bf16 in the same process
    timeout 560 python3 benchmarks/compressed_speed.py --cap --formats bf16,int8,nf4 --tasks t2i,edit --commit "$c" \
      --out "$out/compressed.jsonl" 2>&1 | grep -v -i warn \
      | grep -o '"weights": "[^"]*"\|"task": "[a-z0-9]*"\|"cap_gib": [0-9.a-z]*\|"seconds": [0-9.]*\|"vs_bf16": [0-9.]*' \
      | paste -s -d' ' | sed 's/"weights"/\n"weights"/g' ;;
  budget-edit)  # the FP8 edit under 15.5 GiB with the shared prefix (placement's chunks; the first run twice: a fresh
    # machine's first run is slow), the 12 GB recipe's edit, uncapped, then without the sharing (+copied), without
    # CUDA graphs (the denoiser is rebuilt per request there: is the capture worth it?) and with 4 chunks as before
    # (rows kept on a timeout)
    timeout 570 python3 benchmarks/budget_memory.py --commit "$c" --out "$out/budget.jsonl" \
      --runs fp8@15.5:edit,fp8@15.5:edit,fp8-gen-nf4-und@12:edit,fp8:edit,fp8@15.5:edit+copied,fp8@15.5:edit+eager,fp8@15.5:edit+chunks4,fp8@15.5:edit+copied+chunks4 \
      >/dev/null 2>&1
    python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["weights"], r["budget_gib"], r["task"], "+".join(r["modes"]), r.get("seconds"), r.get("mlp_chunks"),
          r.get("peak_gib"), r.get("denoiser_kept"), (r.get("error") or "")[:120])' "$out/budget.jsonl" ;;
  store)  # what the per-layer copy of the caches costs (uncapped: the copy alone), then the budget targets
    timeout 560 python3 benchmarks/budget_memory.py --commit "$c" --out "$out/budget.jsonl" \
      --runs fp8:edit,fp8:edit+layered,fp8@15.5:edit,fp8@15.5:edit+layered,fp8:edit,fp8:edit+layered,fp8@15.5:t2i,fp8-gen-nf4-und@12:t2i,fp8-gen-nf4-und@12:edit,fp8:t2i \
      >/dev/null 2>&1
    python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["weights"], r["budget_gib"], r["task"], "+".join(r["modes"]), r.get("seconds"), r.get("mlp_chunks"),
          r.get("peak_gib"), r.get("denoiser_kept"), r.get("phase_seconds"), (r.get("error") or "")[:120])' "$out/budget.jsonl" ;;
  *) echo "part must be decode, wgmma, wkernels, lean, df11, kernels, budget, budget-few, targets, caps, budget-edit or store"
     exit 2 ;;
esac
