#!/usr/bin/env bash
# The study of issue "Evidence": Off2OnRL and UPQ fine-tuned from the same CQL agents worth fine-tuning.
#
#   STAGE=data bash results/evidence/run.sh      # Hopper medium-replay from make_dataset.py (15 min on one core here:
#                                                 # SAC to its first evaluation >= 1,422, 90,761 steps at ~100 steps/s),
#                                                 # written in D4RL layout to
#                                                 # results/evidence/hopper_medium_replay-v2.hdf5
#                                                 # (17 MB, git-ignored: made again in 15 min, the same 90,761
#                                                 # transitions, 727 episodes and mean return 329 on 2026-11-26 and -27)
#   STAGE=cql bash results/evidence/run.sh       # 4 CQL agents, the paper's 2x256 networks, $CQL_STEPS (default 40k)
#                                                 # steps, 10k of them behaviour cloning: ~2 min on an H100; on a CPU
#                                                 # add EXTRA=--compile, continue with EXTRA="--compile --resume".
#                                                 # The cql_agents/checkpoint.pt in git: the agents of such a run on
#                                                 # this 2-core CPU at step 40,000 (started with --total-steps 60000,
#                                                 # stopped at 40,784), weights only, saved in the older per-agent
#                                                 # layout and converted by results/convert_set.py
#   STAGE=finetune bash results/evidence/run.sh  # from cql_agents/: Off2OnRL and UPQ beta 0.1 / 0.01 / 0.001, seeds
#                                                 # 1-3, 20k env steps, $JOBS runs at a time (default 2: one per core);
#                                                 # run again, it skips the runs done and resumes those
#                                                 # whose checkpoints are in $CKPT; then fig2.png, table.md
#                                                 # and final_eval.csv / .md (each run's last pi^E, 100 episodes)
#                                                 # and stats.md / .csv (rliable: IQM, mean, P(UPQ > Off2OnRL))
#                                                 # (SEEDS="4 5" METHODS="off2on upq:0.1": more seeds of some;
#                                                 # JOBS=20 SEEDS="6 7 8 9 10" EXTRA="--device cuda": 20 runs at once
#                                                 # on one GPU, best under CUDA MPS, nvidia-cuda-mps-control -d)
#   STEPS=200000 SUB=budget200k/ SEEDS="1 2 3" METHODS="off2on upq:0.001" STAGE=finetune bash results/evidence/run.sh
#                                                 # the paper's online budget (200 epochs): runs in $OUT/budget200k/
#                                                 # (PLOT_METHODS="off2on upq:0.001": the figure's and tables' methods)
#   EARLY=10000 STAGE=analysis bash results/evidence/run.sh
#                                                 # the figure and tables again, the early drop over env steps 1-10k,
#                                                 # over the files in $OUT (final_eval.* over the runs at env step
#                                                 # $STEPS whose checkpoints are in $CKPT: a clone has none, and
#                                                 # keeps git's)
#
# KIND=medium-expert runs the same stages on Hopper medium-expert in $OUT=results/medium_expert (issue "Test the paper
# where it claims most"): STAGE=data makes D4RL's medium and expert halves side by side (SAC seed 0 to the medium
# level; SAC seed 1 for 150k steps, its best evaluation rolled out), 1M transitions each, then their union;
# with POLICIES=results/medium_expert/policies it rolls out the two saved behaviour policies instead (no SAC).
#
# Everything lands in $OUT (default results/evidence/): the agents (cql_agents/checkpoint.pt) and one folder per run
# with its eval.csv, metrics.csv, config.json and train.log; the fine-tuned checkpoints stay outside git ($CKPT,
# default runs/evidence). STAGE=analysis makes the figure and tables alone, from the runs in $OUT and the checkpoints
# in $CKPT, and starts no run (e.g. this commit's analysis of runs made by an earlier fixed commit).
set -euo pipefail
cd "$(dirname "$0")/../.."
KIND=${KIND:-medium-replay}   # the D4RL-style dataset: medium-replay or medium-expert
if [[ $KIND != medium-replay && $KIND != medium-expert ]]; then
  echo "error: KIND must be medium-replay or medium-expert, not $KIND" >&2; exit 2
fi
OUT=${OUT:-results/$([[ $KIND == medium-replay ]] && echo evidence || echo medium_expert)}
DATA=$OUT/hopper_${KIND//-/_}-v2.hdf5
TASK="Hopper $KIND"
CKPT=${CKPT:-runs/$(basename "$OUT")}
STEPS=${STEPS:-20000}   # env steps of fine-tuning (the paper: 200,000)
SUB=${SUB:-}            # a subfolder of $OUT and $CKPT for the runs (e.g. budget200k/)
[[ -z $SUB || $SUB == */ ]] || SUB=$SUB/
EARLY=${EARLY:-5000}    # the early drop: each run's lowest score at env steps 1 .. $EARLY
read -r -a extra <<< "${EXTRA:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
finished() { grep -q "^$STEPS," "$1/eval.csv" 2>/dev/null; }  # the run folder $1 has logged its last evaluation

case ${STAGE:?STAGE=data, cql, finetune or analysis} in
data)
  if [[ $KIND == medium-expert && -n ${POLICIES:-} ]]; then  # the halves rolled out from the saved policies
    python make_dataset.py --env Hopper-v5 --kind medium --seed 0 \
      --behaviour-policy "$POLICIES/hopper-medium-seed0.pt" &
    medium=$!
    python make_dataset.py --env Hopper-v5 --kind expert --seed 1 --behaviour-policy "$POLICIES/hopper-expert-seed1.pt"
    wait $medium
  elif [[ $KIND == medium-expert ]]; then  # the two halves in parallel, one core each, then their union
    python make_dataset.py --env Hopper-v5 --kind medium --seed 0 &
    medium=$!
    python make_dataset.py --env Hopper-v5 --kind expert --seed 1 --total-timesteps 150000
    wait $medium
  fi
  python make_dataset.py --env Hopper-v5 --kind "$KIND"
  python - "$DATA" "$KIND" <<'EOF'
import sys

import h5py

from plumbing import read_minari  # the transitions exactly as the training scripts read a Minari dataset

data = read_minari(f"local/hopper/{sys.argv[2]}-v0")[0]
with h5py.File(sys.argv[1], "w") as f:
    for key, array in data.items():
        f.create_dataset(key, data=array, compression="gzip", compression_opts=9)
print(f"wrote {sys.argv[1]}: {len(data['rewards']):,} transitions")
EOF
  md5sum "$DATA"
  ;;
cql)
  python cql_pretrain.py --env "$DATA" --num-agents 4 --total-steps "${CQL_STEPS:-40000}" --bc-steps 10000 \
    --eval-every 5000 \
    --save-every 1000 --log-every 1000 --save-dir $OUT/cql_agents --run-dir $OUT/cql "${extra[@]}"
  ;;
finetune|analysis)  # analysis: the figure and tables alone, from the runs already in $OUT (it starts none)
  RUNS=$OUT/$SUB
  if [[ $STAGE == finetune ]]; then
    jobs=()
    mkdir -p "$CKPT/$SUB" "$RUNS"
    for seed in ${SEEDS:-1 2 3}; do
      for method in ${METHODS:-off2on upq:0.1 upq:0.01 upq:0.001}; do
        name=$SUB${method/:/_beta}_seed$seed
        finished "$OUT/$name" && continue  # done
        script=${method%%:*}_finetune.py
        flags=(); [[ $method == upq:* ]] && flags=(--beta "${method#upq:}")
        if [[ -f $CKPT/$name/checkpoint.pt ]]; then flags+=(--resume)  # a run stopped or cut short continues
        elif [[ -f $OUT/$name/eval.csv ]]; then flags+=(--overwrite); fi  # killed before its first save: anew
        python "$script" --env "$DATA" --checkpoints $OUT/cql_agents --seed $seed --total-steps "$STEPS" \
          "${flags[@]}" --save-dir "$CKPT/$name" --run-dir "$OUT/$name" "${extra[@]}" >> "$CKPT/$name.log" 2>&1 &
        jobs+=($!)
        if (( ${#jobs[@]} >= ${JOBS:-2} )); then wait "${jobs[0]}"; jobs=("${jobs[@]:1}"); fi
      done
    done
    for job in "${jobs[@]}"; do wait "$job"; done
  fi
  series=("$TASK:CQL agents=$OUT/cql/eval.csv"); sets=()
  for method in ${PLOT_METHODS:-off2on upq:0.1 upq:0.01 upq:0.001}; do  # the methods of the figure and tables
    label=Off2OnRL; [[ $method == upq:* ]] && label="UPQ beta ${method#upq:}"
    series+=("$TASK:$label=${RUNS}${method/:/_beta}_seed*/eval.csv")
    while read -r run; do  # final_eval.py scores the runs that reached $STEPS (seed2 before seed10)
      name=$SUB$(basename "$run")
      if finished "$run" && [[ -f $CKPT/$name/checkpoint.pt ]]; then
        sets+=("$CKPT/$name")
      fi
    done < <(compgen -G "${RUNS}${method/:/_beta}_seed*" | sort -V)
  done
  python results/plot.py --figure "${RUNS}fig2.png" --table "${RUNS}table.md" --ensemble-level --diagnostics \
    --final-evals 5 --early-steps "$EARLY" --series "${series[@]}"
  python results/stats.py --early-steps "$EARLY" --table "${RUNS}stats.md" --csv "${RUNS}stats.csv" \
    --series "${series[@]:1}"  # rliable
  if (( ${#sets[@]} )); then
    python results/evidence/final_eval.py --episodes 100 --csv "${RUNS}final_eval.csv" \
      --table "${RUNS}final_eval.md" --sets "${sets[@]}"
  else
    echo "no checkpoint in $CKPT/$SUB of a run at env step $STEPS: ${RUNS}final_eval.csv / .md left as they are"
  fi
  ;;
esac
