#!/usr/bin/env bash
# GPU call 2: all GPU-marked tests, compressed decode (profiled), FP8 native decode A/B, step-cache settings
set -u
C=$1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "pip failed"
start=$(date +%s)
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
echo "tests took $(( $(date +%s) - start )) s"
timeout 150 python3 benchmarks/compressed_speed.py --commit $C --out $OUT/decode.jsonl \
  --formats bf16,int8,nf4,fp8 --tasks decode --profile-steps 64 2>&1 | grep -v "^{" | tail -5
timeout 80 python3 benchmarks/compressed_speed.py --commit $C --out $OUT/decode_native.jsonl \
  --formats bf16,fp8 --tasks decode --fp8-native 2>&1 | grep -v "^{" | tail -5
python3 - <<'PY'
import json, os
for f in ("decode.jsonl", "decode_native.jsonl"):
    for l in open(os.environ["OUT"] + "/" + f):
        r = json.loads(l)
        print(f, r.get("weights"), r.get("fp8_native"), r.get("tokens_per_s"), r.get("vs_bf16_tokens_per_s"),
              r.get("kernel_total_ms"), json.dumps(r.get("kernel_ms")), r.get("error"))
        for t in (r.get("top_kernels") or [])[:6]:
            print("    ", t)
PY
echo "at $(( $(date +%s) - start )) s"
timeout 200 python3 benchmarks/step_cache.py --random-weights 7b --tasks t2i --runs 1 --commit $C \
  --out $OUT/step_cache.jsonl 2>&1 | tail -14
echo "total $(( $(date +%s) - start )) s"
