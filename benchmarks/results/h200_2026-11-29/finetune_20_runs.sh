# The script that ran seeds 6-10 of the 20k study on an H200 on 2026-11-29 (the body as run, this header added),
# from the repository root, with the image's missing wheels and the dataset in .devcarry/ (git-ignored):
#   MPS=1 STEPS=20000 SEEDS="6 7 8 9 10" METHODS="off2on upq:0.1 upq:0.01 upq:0.001" RUN_S=380 EVAL_S=70 \
#     bash finetune_20_runs.sh
# All runs at once under CUDA MPS, then each run's final pi^E over 100 episodes; logs and run folders into runs.tgz.
[ "${SKIP_SETUP:-0}" = 1 ] || source .devcarry/setup.sh
export OMP_NUM_THREADS=1
DEVICE=${DEVICE:-cuda}
if [ "${MPS:-0}" = 1 ]; then export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p /tmp/mps /tmp/mpslog; nvidia-cuda-mps-control -d; fi
mkdir -p /tmp/logs /tmp/ckpt
(while sleep 15; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done) \
  > /tmp/logs/gpu_util.txt 2>&1 &
names=(); pids=()
for seed in $SEEDS; do for method in $METHODS; do
  name=${method/:/_beta}_seed$seed; names+=("$name")
  flags=(); [[ $method == upq:* ]] && flags=(--beta "${method#upq:}")
  timeout "$RUN_S" python3 ${method%%:*}_finetune.py --env .devcarry/hopper_medium_replay-v2.hdf5 \
    --checkpoints results/evidence/cql_agents --seed "$seed" --total-steps "$STEPS" "${flags[@]}" --device "$DEVICE" \
    --save-dir /tmp/ckpt/$name --run-dir results/evidence/$name > /tmp/logs/$name.log 2>&1 &
  pids+=($!)
done; done
wait "${pids[@]}"
echo "fine-tuning ended $(date)"
pids=()
for name in "${names[@]}"; do
  timeout "$EVAL_S" python3 results/evidence/final_eval.py --episodes 100 --sets /tmp/ckpt/$name \
    --csv /tmp/logs/fe_$name.csv --table /tmp/logs/fe_$name.md > /tmp/logs/fe_$name.log 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
echo "final evaluations ended $(date)"
tar czf "$OUT/runs.tgz" /tmp/logs $(printf 'results/evidence/%s ' "${names[@]}")
tail -n 2 /tmp/logs/*_seed*.log
