#!/usr/bin/env bash
# Second GPU call (after the writer threads, batched bf16 inference and the fused HSV jitter):
# inference over 512 VOC-sized images (fixed costs amortised), and whole training epochs.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
. benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
W=$(( $(nproc) - 1 ))
python3 -m vitpcm bench --preset voc12 --device cuda --section infer --images 512 --repeats 2 \
  --json "$OUT/bench_gpu_infer_bf16.json" -q infer.amp=true infer.batch_size=16 data.num_workers=$W \
  --note "one H100, bf16 inference (infer.amp), batch 16, 512 images" 2>&1 | grep -v Warning | tee "$OUT/bench_gpu_infer_bf16.log"
python3 benchmarks/gpu_train_epoch.py --images 2048 --epochs 3 --json "$OUT/train_epochs.json" \
  --variant bf16_b64 train.amp=true train.batch_size=64 train.global_batch=64 2>&1 | grep -v Warning | tee "$OUT/train_epochs.log"
python3 -m vitpcm bench --preset voc12 --device cuda --section infer --images 256 --repeats 2 \
  --json "$OUT/bench_gpu_infer_fp32.json" -q infer.batch_size=16 data.num_workers=$W \
  --note "one H100, fp32 inference like the authors, batch 16, 256 images" 2>&1 | grep -v Warning | tee "$OUT/bench_gpu_infer_fp32.log"
