#!/usr/bin/env bash
# The reduced-scale study of the README's "Results" section, for one Hopper dataset made by
# make_dataset.py: 4 CQL agents, then Off2OnRL and UPQ (beta 0.001) fine-tuning for seeds 1-3.
#
#   bash results/run_reduced.sh medium            # needs local/hopper/medium-v0
#   STAGE=cql bash results/run_reduced.sh medium  # only the CQL agents (STAGE=finetune: only fine-tuning)
#   STAGE=finetune SEEDS=2 METHODS=upq bash results/run_reduced.sh medium  # one fine-tuning run
#
# Budgets (a 2-core CPU, one process per core): 2x64 networks, 10k CQL steps, 10 fine-tuning
# epochs of 1,000 env steps. eval.csv files and logs go to results/hopper-<kind>/, checkpoints to
# $CKPT (default runs/reduced/). EXTRA="--resume" continues stopped runs (EXTRA is added to every command).
set -euo pipefail
kind=${1:?usage: run_reduced.sh medium|medium-replay|medium-expert}
out=results/hopper-$kind
ckpt=${CKPT:-runs/reduced}/hopper-$kind
cql_steps=${CQL_STEPS:-10000}
finetune_steps=${FINETUNE_STEPS:-10000}
seeds=${SEEDS:-1 2 3}
methods=${METHODS:-off2on upq}
export OMP_NUM_THREADS=1
read -r -a extra_flags <<< "${EXTRA:-}"
mkdir -p "$out"

if [[ ${STAGE:-all} != finetune ]]; then
  python cql_pretrain.py --env "local/hopper/$kind-v0" --num-agents 4 --hidden-sizes 64 64 \
    --total-steps "$cql_steps" --bc-steps 2000 --eval-every 2000 --eval-episodes 5 \
    --save-dir "$ckpt/cql" --run-dir "$out/cql" "${extra_flags[@]}" 2>&1 | tee -a "$out/cql.log"
fi
if [[ ${STAGE:-all} != cql ]]; then
  for seed in $seeds; do
    for method in $methods; do
      extra=()
      [[ $method == upq ]] && extra=(--beta 0.001)
      python "${method}_finetune.py" --env "local/hopper/$kind-v0" --checkpoints "$ckpt/cql" --seed "$seed" \
        --total-steps "$finetune_steps" --eval-episodes 5 --density-ratio-hidden-sizes 64 64 "${extra[@]}" \
        --save-dir "$ckpt/${method}_seed$seed" --run-dir "$out/${method}_seed$seed" "${extra_flags[@]}" 2>&1 | tee -a "$out/${method}_seed$seed.log"
    done
  done
fi
