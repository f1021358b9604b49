#!/bin/bash
# The strong and weak scaling sweeps of jobs/*_scaling.sbatch on one machine, with mpiexec.
#   bash jobs/local.sh [strong|weak|both]     (settings below; results in runs/local-<date>/)
# On a machine with fewer cores than ranks the numbers measure oversubscription, not scaling:
# the report says so.
# ---- settings ---------------------------------------------------------------------------------
CLIENT_RANKS="${CLIENT_RANKS:-1 2 4}"
SERVERS=1
TOTAL_SAMPLES=${TOTAL_SAMPLES:-8192}   # strong: fixed total
PER_CLIENT=${PER_CLIENT:-4096}         # weak: fixed per client rank
ROUNDS=${ROUNDS:-3}                    # round 1 is warm-up, excluded
SETTINGS="--set data.dataset=\"synthetic\" --set model.name=\"cnn\" --set train.batch_size=32"
RESULTS="${RESULTS:-runs/local-$(date +%Y%m%d-%H%M%S)}"
# -------------------------------------------------------------------------------------------------
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export MPIEXEC_TIMEOUT=${MPIEXEC_TIMEOUT:-1800}
sweep() {  # sweep strong|weak
    for N in $CLIENT_RANKS; do
        if [ "$1" = strong ]; then SAMPLES=$TOTAL_SAMPLES; else SAMPLES=$((N * PER_CLIENT)); fi
        $BIN/mpiexec -n $((N + 1 + SERVERS)) $BIN/python -m mpi4py -m mpi_sfl train $SETTINGS \
            --set train.clients=$N --set sfl.servers=$SERVERS --set data.train_samples=$SAMPLES \
            --set train.rounds=$ROUNDS --set run.progress=\"lines\" --set "run.out_dir=\"$RESULTS/$1/n$N\"" \
            --overwrite  # RESULTS=an earlier sweep's dir re-measures it
    done
    $BIN/python -m benchmarks.scaling_report "$1" "$RESULTS/$1"
}
case "${1:-both}" in
    strong|weak) sweep "$1" ;;
    both) sweep strong; sweep weak ;;
    *) echo "usage: $0 [strong|weak|both]" >&2; exit 2 ;;
esac
