#!/usr/bin/env bash
# The whole method on a laptop CPU in about 10-11 minutes (2 cores): the same scripts as the paper's protocol, with
# small flags. InvertedDoublePendulum-v5 instead of Hopper: its SAC behaviour agent learns in about a minute, its
# return is graded (not all-or-nothing), and its medium-replay data (everything SAC saw until its evaluation return
# first passed 2,000) is poor, so the CQL agents are weak and fine-tuning has room to lift them.
#
#   1. make_dataset.py   a D4RL-style medium-replay dataset, as a local Minari dataset
#   2. cql_pretrain.py   4 CQL agents (2x64 networks, 2,000 gradient steps)
#   3. off2on_finetune.py and upq_finetune.py (beta 0.001): the agents fine-tuned online as one ensemble for
#      30,000 env steps, seeds 1 and 2, the two methods side by side (one process per core)
#   4. results/plot.py   the figure: the pre-trained ensemble's level, both methods' curves, U, Q^E, beta U / |y|
#
# Output: runs/quickstart/ (logs, eval.csv and metrics.csv of every run, fig.png, table.md), checkpoints/quickstart/
# and the Minari dataset local/quickstart/inverteddoublependulum/medium-replay-v0 (its own id: --overwrite replaces no
# dataset of yours). Run it again and it starts over (--overwrite); the SAC run is reused.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1  # one thread per process: two fine-tuning runs share the 2 cores
OUT=runs/quickstart
CKPT=checkpoints/quickstart
DATA=local/quickstart/inverteddoublependulum/medium-replay-v0
mkdir -p $OUT
started=$(date +%s)

python make_dataset.py --env InvertedDoublePendulum-v5 --kind medium-replay --target-return 2000 \
  --learning-starts 1000 --eval-frequency 1000 --total-timesteps 20000 --dataset-id $DATA --overwrite \
  | tee $OUT/make_dataset.log

python cql_pretrain.py --env $DATA --num-agents 4 --hidden-sizes 64 64 --total-steps 2000 --bc-steps 1000 \
  --eval-every 500 --log-every 500 --save-dir $CKPT/cql --run-dir $OUT/cql --overwrite | tee $OUT/cql.log

for seed in 1 2; do
  pids=()
  for method in off2on upq; do  # upq_finetune.py's --beta defaults to the paper's 0.001
    python ${method}_finetune.py --env $DATA --checkpoints $CKPT/cql --seed $seed --total-steps 30000 \
      --first-epoch-multiplier 5 --density-ratio-hidden-sizes 64 64 \
      --save-dir $CKPT/${method}_seed$seed --run-dir $OUT/${method}_seed$seed --overwrite \
      > $OUT/${method}_seed$seed.log 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait $pid; done  # a failed run stops the script (set -e)
  grep -h "env steps 30,000" $OUT/off2on_seed$seed.log $OUT/upq_seed$seed.log
done

python results/plot.py --figure $OUT/fig.png --table $OUT/table.md --ensemble-level --diagnostics --series \
  "InvertedDoublePendulum medium-replay:CQL agents=$OUT/cql/eval.csv" \
  "InvertedDoublePendulum medium-replay:Off2OnRL=$OUT/off2on_seed*/eval.csv" \
  "InvertedDoublePendulum medium-replay:UPQ (beta 0.001)=$OUT/upq_seed*/eval.csv"
echo "quickstart done in $(( ($(date +%s) - started) / 60 )) min $(( ($(date +%s) - started) % 60 )) s: $OUT/fig.png"
