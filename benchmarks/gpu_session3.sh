#!/usr/bin/env bash
# Third GPU call (after data.transforms_on: workers decode and draw, the pixels are made on
# the GPU): whole training epochs and the inference stage, each beside the former
# loader-side transforms in the same call. About 8 minutes on one H100 / H200.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
. benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
W=$(( $(nproc) - 1 ))
python3 benchmarks/gpu_train_epoch.py --images 2048 --epochs 2 --json "$OUT/train_epochs_transforms.json" \
  --variant bf16_b64_device train.amp=true train.batch_size=64 train.global_batch=64 data.num_workers=$W data.transforms_on=device \
  --variant bf16_b64_loader train.amp=true train.batch_size=64 train.global_batch=64 data.num_workers=$W data.transforms_on=loader \
  2>&1 | grep -v Warning | tee "$OUT/train_epochs_transforms.log"
python3 benchmarks/gpu_infer_profile.py --images 512 --json "$OUT/infer_profile_transforms.json" data.num_workers=8 \
  2>&1 | grep -v Warning | tail -n 40 | tee "$OUT/infer_profile_transforms.log"
