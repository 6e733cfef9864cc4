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
#       [--remote-min-tokens 1024] [--greedy-words 500]
#
# Shapes: agg1 = one aggregated worker; agg2 = two aggregated workers; disagg = one prefill
# and one decode worker (all on --device; with cuda:N every worker is an executor on GPU N);
# disagg-proc = the same two workers as two `turbine worker` processes (KV between them by a
# device copy through the pool's CUDA IPC handle on a GPU, else over the transfer plane's
# sockets; turbine_disagg_transfer_paths says which).
# The remote-prefill threshold is 1024 uncached tokens (--remote-min-tokens): the long
# prompts go to the prefill worker, the short ones are prefilled where they decode. Each
# shape also answers one greedy request of --greedy-words words (past the threshold); its
# text must be the same in every shape and run (checked at the end).
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
REMOTE_MIN=1024
GREEDY_WORDS=500
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
    --remote-min-tokens) REMOTE_MIN=$2; shift 2;;
    --greedy-words) GREEDY_WORDS=$2; shift 2;;
    --out) OUT_DIR=$2; shift 2;;
    -h|--help) sed -n '2,21p' "$0"; exit 0;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
mkdir -p "$OUT_DIR"

worker() { # role replicas [remote]
  cat <<EOF
  - role: $1
    replicas: $2
    remote: ${3:-false}
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
    disagg|disagg-proc)
      local remote=false
      [ "$1" = disagg-proc ] && remote=true
      worker prefill 1 $remote
      worker decode 1 $remote
      cat <<EOF
disaggregation:
  policy: conditional
  remote_prefill_min_tokens: $REMOTE_MIN
  max_prefill_queue: 16
  remote_prefill_timeout_ms: 120000
EOF
      if [ "$remote" = true ]; then
        cat <<EOF
  transfer:
    bind: 127.0.0.1:0
transport:
  bind: 127.0.0.1:$(($2 + 100))
discovery:
  backend: embedded
  registry: 127.0.0.1:$(($2 + 100))
  lease_ms: 3000
EOF
      fi
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
    procs=""
    if [ "$shape" = disagg-proc ]; then
      for role in prefill decode; do
        "$TURBINE" worker -f "$file" --role $role --bind 127.0.0.1:0 --no-fetch \
          >"$OUT_DIR/$shape-run$run.$role.log" 2>&1 &
        procs="$procs $!"
      done
    fi
    trap 'kill $server $procs 2>/dev/null || true' EXIT
    wait_ready "$PORT"
    url="http://127.0.0.1:$PORT"
    if [ "$shape" = disagg-proc ]; then
      # Until the prefill worker has joined: a long warm-up request goes remote.
      for _ in $(seq 1 120); do
        "$TURBINE" bench serve --url "$url" --concurrency 1 --requests-per-level 1 \
          --prompt-tokens "$LONG_TOKENS" --max-tokens 2 --ignore-eos --warmup 0 --seed 98 >/dev/null
        if curl -sf "$url/metrics" | grep -q '^turbine_disagg_prefill_decisions_total{decision="remote"}'; then
          break
        fi
        sleep 0.5
      done
    fi
    # One greedy request with a long prompt (remote prefill where disaggregated), its text
    # compared at the end.
    words=$(for i in $(seq 1 "$GREEDY_WORDS"); do printf 'w%d ' $((i * 7919 % 1000)); done)
    name=$(curl -sf "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])' || true)
    curl -sf "$url/v1/chat/completions" -H 'content-type: application/json' \
      -d "{\"model\":\"$name\",\"messages\":[{\"role\":\"user\",\"content\":\"$words\"}],\"max_tokens\":48,\"temperature\":0}" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' \
      >"$OUT_DIR/$shape-run$run.greedy.txt" || echo "(greedy request failed)" >"$OUT_DIR/$shape-run$run.greedy.txt"
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
    curl -sf "$url/metrics" | grep -E '^turbine_disagg_|^turbine_kv_transfer|^turbine_transfer' \
      >"$OUT_DIR/$shape-run$run.metrics" || true
    kill $server $procs 2>/dev/null || true
    wait $server $procs 2>/dev/null || true
    echo "== $shape, run $run: long ($LONG_REQUESTS x $LONG_TOKENS tokens at $LONG_CONC)"
    cat "$OUT_DIR/$shape-run$run.long.txt"
    echo "== $shape, run $run: short ($SHORT_REQUESTS x $SHORT_TOKENS tokens at $SHORT_CONC)"
    cat "$OUT_DIR/$shape-run$run.short.txt"
    echo "== $shape, run $run: disaggregation counters"
    cat "$OUT_DIR/$shape-run$run.metrics"
  done
done
echo "== greedy text of one long prompt, per shape and run (must all be equal)"
md5sum "$OUT_DIR"/*.greedy.txt
if [ "$(md5sum "$OUT_DIR"/*.greedy.txt | awk '{print $1}' | sort -u | wc -l)" -eq 1 ]; then
  echo "greedy: identical in every shape"
else
  echo "greedy: DIFFERS between shapes"
fi
