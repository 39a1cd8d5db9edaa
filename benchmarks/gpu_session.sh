#!/usr/bin/env bash
# The GPU figures of docs/scaling.md, in one call on a lent GPU machine (needs .whl/, see
# benchmarks/gpu_setup.sh). Writes everything under $OUT (default ./gpu_out).
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
. benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
tail -2 "$OUT/setup.log"
W=$(( $(nproc) - 1 ))
python3 -m vitpcm bench --preset voc12 --device cuda --section infer --section train --images 64 --repeats 3 \
  --steps 20 --batch 64 --json "$OUT/bench_gpu_bf16.json" -q train.amp=true infer.amp=true infer.batch_size=16 \
  data.num_workers=$W --note "one H100, bf16 (train.amp, infer.amp), infer batch 16" 2>&1 | grep -v Warning | tee "$OUT/bench_gpu_bf16.log"
python3 -m vitpcm bench --preset voc12 --device cuda --section infer --images 64 --repeats 3 \
  --json "$OUT/bench_gpu_fp32_infer.json" -q infer.batch_size=16 data.num_workers=$W \
  --note "one H100, fp32 inference like the authors, batch 16" 2>&1 | grep -v Warning | tee "$OUT/bench_gpu_fp32_infer.log"
python3 benchmarks/gpu_train_epoch.py --images 2048 --epochs 3 --json "$OUT/train_epochs.json" \
  --variant bf16_b64 train.amp=true train.batch_size=64 train.global_batch=64 \
  --variant bf16_b64_compile train.amp=true train.batch_size=64 train.global_batch=64 train.compile=true \
  --variant fp32_paper train.amp=false 2>&1 | grep -v Warning | tee "$OUT/train_epochs.log"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/setup.log"
