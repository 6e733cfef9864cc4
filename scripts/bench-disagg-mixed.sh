#!/usr/bin/env bash
# Aggregated vs disaggregated serving under a mixed workload: long prompts among short ones,
# two `turbine bench serve` clients at once against one `turbine up`, for each cluster shape
# in turn (a fresh server each). Prints each client's table and the server's disaggregation
# counters; writes the JSON reports under $OUT_DIR.
#
#   scripts/bench-disagg-mixed.sh [--turbine BIN] [--model PATH] [--device cpu|cuda:N]
#       [--shapes "agg1 agg2 disagg"] [--runs N] [--long-tokens 4000] [--long-requests 8]
#       [--long-concurrency 2] [--short-tokens 128] [--short-requests 256]
#       [--short-concurrency 32] [--max-tokens 128] [--kv-blocks 8192] [--out DIR]
#
# Shapes: agg1 = one aggregated worker; agg2 = two aggregated workers; disagg = one prefill
# and one decode worker (all on --device; with cuda:N every worker is an executor on GPU N).
# The remote-prefill threshold is 1024 uncached tokens: the long prompts go to the prefill
# worker, the short ones are prefilled where they decode.
set -euo pipefail

TURBINE=target/release/turbine
MODEL=default
DEVICE=cpu
SHAPES="agg1 agg2 disagg"
RUNS=1
LONG_TOKENS=4000
LONG_REQUESTS=8
LONG_CONC=2
SHORT_TOKENS=128
SHORT_REQUESTS=256
SHORT_CONC=32
MAX_TOKENS=128
KV_BLOCKS=8192
OUT_DIR=${OUT:-/tmp}/disagg-mixed
PORT=8131
while [ $# -gt 0 ]; do
  case "$1" in
    --turbine) TURBINE=$2; shift 2;;
    --model) MODEL=$2; shift 2;;
    --device) DEVICE=$2; shift 2;;
    --shapes) SHAPES=$2; shift 2;;
    --runs) RUNS=$2; shift 2;;
    --long-tokens) LONG_TOKENS=$2; shift 2;;
    --long-requests) LONG_REQUESTS=$2; shift 2;;
    --long-concurrency) LONG_CONC=$2; shift 2;;
    --short-tokens) SHORT_TOKENS=$2; shift 2;;
    --short-requests) SHORT_REQUESTS=$2; shift 2;;
    --short-concurrency) SHORT_CONC=$2; shift 2;;
    --max-tokens) MAX_TOKENS=$2; shift 2;;
    --kv-blocks) KV_BLOCKS=$2; shift 2;;
    --out) OUT_DIR=$2; shift 2;;
    -h|--help) sed -n '2,16p' "$0"; exit 0;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
mkdir -p "$OUT_DIR"

worker() { # role replicas
  cat <<EOF
  - role: $1
    replicas: $2
    device: $DEVICE
    kv_blocks: $KV_BLOCKS
    block_size: 16
    max_num_batched_tokens: 4096
    max_num_seqs: 128
EOF
}

cluster() { # shape port
  cat <<EOF
model:
  path: $MODEL
http:
  host: 127.0.0.1
  port: $2
router:
  policy: kv
workers:
EOF
  case "$1" in
    agg1) worker aggregated 1;;
    agg2) worker aggregated 2;;
    disagg)
      worker prefill 1
      worker decode 1
      cat <<EOF
disaggregation:
  policy: conditional
  remote_prefill_min_tokens: 1024
  max_prefill_queue: 16
  remote_prefill_timeout_ms: 120000
EOF
      ;;
    *) echo "unknown shape $1" >&2; exit 2;;
  esac
}

wait_ready() { # port
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$1/ready" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "the server on port $1 did not become ready" >&2
  return 1
}

for run in $(seq 1 "$RUNS"); do
  for shape in $SHAPES; do
    PORT=$((PORT + 1))
    file="$OUT_DIR/$shape.yaml"
    cluster "$shape" "$PORT" >"$file"
    log="$OUT_DIR/$shape-run$run.server.log"
    "$TURBINE" up -f "$file" --no-fetch >"$log" 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    wait_ready "$PORT"
    url="http://127.0.0.1:$PORT"
    # Warm both paths once (a long and a short request), not counted.
    "$TURBINE" bench serve --url "$url" --concurrency 1 --requests-per-level 1 \
      --prompt-tokens "$LONG_TOKENS" --max-tokens 8 --ignore-eos --warmup 1 --seed 99 >/dev/null
    "$TURBINE" bench serve --url "$url" --concurrency "$LONG_CONC" \
      --requests-per-level "$LONG_REQUESTS" --prompt-tokens "$LONG_TOKENS" \
      --max-tokens "$MAX_TOKENS" --ignore-eos --warmup 0 --seed $((run * 10 + 1)) \
      --json "$OUT_DIR/$shape-run$run.long.json" >"$OUT_DIR/$shape-run$run.long.txt" &
    long=$!
    sleep 1
    "$TURBINE" bench serve --url "$url" --concurrency "$SHORT_CONC" \
      --requests-per-level "$SHORT_REQUESTS" --prompt-tokens "$SHORT_TOKENS" \
      --max-tokens "$MAX_TOKENS" --ignore-eos --warmup 0 --seed $((run * 10 + 2)) \
      --json "$OUT_DIR/$shape-run$run.short.json" >"$OUT_DIR/$shape-run$run.short.txt"
    wait $long
    curl -sf "$url/metrics" | grep -E '^turbine_disagg_|^turbine_kv_transfer' \
      >"$OUT_DIR/$shape-run$run.metrics" || true
    kill $server 2>/dev/null || true
    wait $server 2>/dev/null || true
    echo "== $shape, run $run: long ($LONG_REQUESTS x $LONG_TOKENS tokens at $LONG_CONC)"
    cat "$OUT_DIR/$shape-run$run.long.txt"
    echo "== $shape, run $run: short ($SHORT_REQUESTS x $SHORT_TOKENS tokens at $SHORT_CONC)"
    cat "$OUT_DIR/$shape-run$run.short.txt"
    echo "== $shape, run $run: disaggregation counters"
    cat "$OUT_DIR/$shape-run$run.metrics"
  done
done
