#!/usr/bin/env bash
# GPU call 1 (session 12): GPU-marked tests, compressed decode rates, compressed + TaylorSeer vs_bf16
set -u
C=$1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "pip failed"
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv,noheader
start=$(date +%s)
timeout 170 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests 2>&1 | tail -25 | tee $OUT/gpu_tests.txt
echo "tests took $(( $(date +%s) - start )) s"
timeout 330 python3 benchmarks/compressed_speed.py --commit $C --out $OUT/compressed.jsonl \
  --formats bf16,int8,nf4,fp8 --tasks decode,t2i,edit --taylorseer 2>&1 | grep -v "^{" | tail -20
python3 - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/compressed.jsonl"):
    r = json.loads(l)
    print(r.get("task"), r.get("weights"), r.get("compute"), r.get("seconds"), r.get("tokens_per_s"),
          r.get("vs_bf16"), r.get("vs_bf16_tokens_per_s"), r.get("full_evaluations"), r.get("peak_gib"),
          r.get("rel_l2_latents_vs_bf16"), r.get("error"))
PY
echo "total $(( $(date +%s) - start )) s"
