#!/usr/bin/env bash
# The planner's evaluation in `turbine sim` (docs/PLANNER.md "Evaluation"): for each trace,
# the planner with the Kalman and the constant predictor, then static fleets at the
# planner's peak and at its mean size. Prints one markdown row per run; writes the
# planners' decision logs (CSV) and plots (SVG) under $OUT (default target/planner-eval).
set -euo pipefail
BIN=${TURBINE:-target/debug/turbine}
OUT=${OUT:-target/planner-eval}
mkdir -p "$OUT"
SLO="--slo-ttft-ms 2000 --slo-itl-ms 200"
declare -A TRACES=(
  [bursty]="--arrival surges --rate 4 --duration-s 600"
  [diurnal]="--arrival diurnal --rate 8 --duration-s 600"
  [mooncake]="--trace sim/traces/mooncake_sample.jsonl --time-scale ${MOONCAKE_SCALE:-1} --duration-s 600"
)
row() { # name trace-args extra-args
  local out; out=$($BIN sim --seed 1 --workers "$WORKERS" $2 $SLO $3)
  local within wh
  within=$(grep -o '([0-9.]*% of requests)' <<<"$out" | tr -d '(%' | cut -d' ' -f1)
  wh=$(grep -o 'worker-hours [0-9.]*' <<<"$out" | cut -d' ' -f2)
  echo "| $TRACE | $1 | $within | $wh |"
}
echo "| trace | fleet | % within TTFT and ITL targets | worker-hours |"
echo "|---|---|---|---|"
for TRACE in bursty diurnal mooncake; do
  args=${TRACES[$TRACE]}
  WORKERS=1
  for p in kalman constant; do
    row "planner ($p)" "$args" "--planner sim/planner/$p.yaml --planner-log $OUT/$TRACE-$p.csv"
  done
  peak=$(tail -n +2 "$OUT/$TRACE-constant.csv" "$OUT/$TRACE-kalman.csv" | grep -v '==>' | cut -d, -f4 | sort -n | tail -1)
  mean=$(awk -F, 'NR>1 && $6!=1 {s+=$5; n++} END {m=s/n; printf "%d", (m==int(m))?m:int(m)+1}' "$OUT/$TRACE-constant.csv")
  WORKERS=$peak; row "static at peak ($peak)" "$args" ""
  WORKERS=$mean; row "static at mean ($mean)" "$args" ""
  echo "<!-- $TRACE: $(python3 scripts/planner_plot.py "$OUT/$TRACE-kalman.csv" "$OUT/$TRACE-constant.csv" "$OUT/$TRACE.svg" "$TRACE") -->"
done
