#!/usr/bin/env bash
# Everything that waits for a GPU, in five parts meant to fit the device tool's 10 minutes each, for
# a session lent the device machine (one H100; the tool runs each command in a copy of the
# repository root). If a part runs out of time, run it again with fewer methods.
#
# In order of what issue 5 needs most (a session has 30 minutes of device time, machine start-up
# included, so the last parts may wait for the next one):
#
#   bash benchmarks/gpu_session.sh tests      # pytest -m gpu: bf16, channels-last, SyncBatchNorm, host syncs,
#                                             # FSDP, compiled views
#   bash benchmarks/gpu_session.sh speed      # gpu_training_speed.py: images/s and 200-epoch projection of the three
#                                             # recipes (device views eager and compiled, CPU views in 16 workers)
#   bash benchmarks/gpu_session.sh views      # views_throughput.py on the GPU (eager and compiled) against a
#                                             # 16-worker PIL loader; SimCLR's step with device views (eager,
#                                             # compiled) against pre-made views
#   bash benchmarks/gpu_session.sh overhead   # framework_overhead.py on the GPU: Lightning against a bare loop,
#                                             # and the cost of a host read per step (Lightning's bar, skip policy)
#   bash benchmarks/gpu_session.sh speed-bf16 # speed with Hopper's usual settings (bf16, channels-last, cuDNN benchmark)
#
# Run each through the device tool with carry [".devdata"]; results land in $OUT (JSON, and the
# pytest log). .devdata is git-ignored and holds the CIFAR-10 npz and the wheels the device image
# lacks; make it here, once:
#
#   mkdir -p .devdata/whl && cp ../shared/data/cifar10_jpeg.npz .devdata/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .devdata/whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.14.0
set -euo pipefail

part=${1:?"which part: tests, speed, speed-bf16, views or overhead"}
case "$part" in
  tests|speed|speed-bf16|views|overhead) ;;
  *) echo "unknown part '$part': choose tests, speed, speed-bf16, views or overhead" >&2; exit 2 ;;
esac
[ -d .devdata/whl ] || { echo "no .devdata/whl: make it as this script's header says, and carry .devdata" >&2; exit 2; }
out=${OUT:-benchmarks/results}
mkdir -p "$out"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devdata/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"

case "$part" in
  tests)
    # Only the GPU test files: the device image lacks wandb and the notebook packages other files import.
    python3 -m pytest -m gpu -p no:cacheprovider -rs --durations=10 tests/test_gpu.py tests/test_fsdp_gpu.py 2>&1 \
      | tee "$out/pytest_gpu.log"
    ;;
  speed)
    # Measurement 1 (images/s, 200-epoch projection) for the three recipes: device views (eager and
    # compiled) and per-image CPU views in 16 workers. Device vs pre-made views is the views part.
    python3 benchmarks/gpu_training_speed.py --data .devdata/cifar10_jpeg.npz --cpu-view-workers 16 --compile-views \
      --repeats 0 --out "$out/gpu_training_speed.json"
    ;;
  speed-bf16)
    python3 benchmarks/gpu_training_speed.py --data .devdata/cifar10_jpeg.npz --precision bf16-mixed \
      --channels-last --cudnn-benchmark --repeats 0 --out "$out/gpu_training_speed_bf16.json"
    ;;
  views)
    # Views/s against a 16-worker per-image loader, then step time with device views (eager and
    # compiled) against pre-made views: SimCLR, the lightest step of the three, so the strictest case.
    python3 benchmarks/views_throughput.py --device cuda --batch 512 --compile --loader-workers 16 \
      --out "$out/views_throughput_gpu.json"
    python3 benchmarks/gpu_training_speed.py --data .devdata/cifar10_jpeg.npz --methods SimCLR --compile-views \
      --skip-throughput --out "$out/views_vs_premade_gpu.json"
    ;;
  overhead)
    python3 benchmarks/framework_overhead.py --device cuda --layers 2 2 2 2 --widths 64 128 256 512 \
      --in-chans 3 --batch 256 --steps 120 --warmup 20 --repeats 5 --sync-variants \
      --out "$out/framework_overhead_gpu.json"
    ;;
esac

