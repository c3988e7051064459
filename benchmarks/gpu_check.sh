#!/usr/bin/env bash
# The GPU figures of docs/speed.md, in one go (about 5 minutes on an H100):
#   bash benchmarks/gpu_check.sh OUT_DIR HOPPER_DATASET.hdf5
# 1. the CUDA tests (CUDA graph == eager updates, for CQL and fine-tuning),
# 2. benchmarks/bench_updates.py --device cuda (-> OUT_DIR/results_cuda.csv),
# 3. end to end on the dataset: 4 CQL agents x 10k steps, then UPQ for 10 epochs (10k env steps, 19k updates);
#    their logs print updates/s and, per epoch, env steps/s including acting, evaluation and saving.
# Every part runs even when an earlier one failed; the logs go to OUT_DIR.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR HOPPER_DATASET.hdf5}
data=${2:?usage: gpu_check.sh OUT_DIR HOPPER_DATASET.hdf5}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
  nproc
} 2>&1 | tee "$out/machine.txt"
timeout 300 python3 -m pytest -q tests/test_cql_pretrain.py tests/test_finetune.py -k cuda 2>&1 | tee "$out/tests.log"
if [ "${BENCH:-1}" = 1 ]; then  # BENCH=0 skips it
  timeout 400 python3 benchmarks/bench_updates.py --device cuda --out "$out/results_cuda.csv" 2>&1 | tee "$out/bench.log"
fi
timeout 240 python3 cql_pretrain.py --env "$data" --device cuda --total-steps 10000 --bc-steps 2000 \
  --eval-every 5000 --log-every 1000 --save-dir "$work/cql" --run-dir "$work/cql_run" 2>&1 | tee "$out/cql.log"
timeout 240 python3 upq_finetune.py --env "$data" --device cuda --checkpoints "$work/cql" --total-steps 10000 \
  --save-dir "$work/upq" --run-dir "$work/upq_run" 2>&1 | tee "$out/upq.log"
