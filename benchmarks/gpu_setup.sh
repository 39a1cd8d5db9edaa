#!/usr/bin/env bash
# Set up vitpcm on a lent GPU machine that has torch/timm/tqdm/matplotlib/tensorboard/h5py
# but no network: install the carried wheels (.whl/, see benchmarks.md) into /tmp/site,
# build pydensecrf2 from its sdist, and put src/ on the path. Source it: `. benchmarks/gpu_setup.sh`
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/pydensecrf2-*.tar.gz \
  || echo "pydensecrf2 did not build: the CRF is unavailable in this session"
export PYTHONPATH="$PWD/src:/tmp/site"
export PYTHONUNBUFFERED=1
set +e
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu,utilization.gpu --format=csv
python3 -c "import torch, timm, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'numpy', numpy.__version__)"
