#!/usr/bin/env bash
# The served path against the engine alone, on one GPU, in one run: offline_bench.py on
# Llama-3.1-8B shapes (random bf16 weights), then wattserve serving the same shapes over HTTP
# on loopback, loaded by serve_bench.py at rising Poisson request rates (at least
# ARRIVAL_SECONDS of arrivals each), then serve_vs_offline.py compares the two.
#
# Usage: benchmarks/serve_gpu.sh TOKENIZER_DIR [RATES] [ARRIVAL_SECONDS] [MAX_BATCHED_TOKENS]
# Writes benchmarks/results/{offline,serve,serve_vs_offline}_<gpu>.json (and serve's PNG);
# the server's log goes to /tmp/serve.log.
set -euo pipefail
cd "$(dirname "$0")/.."
tokenizer=$1
rates=${2:-16,32,48,64,inf}
seconds=${3:-30}
chunk=${4:-2048}
python3 benchmarks/offline_bench.py --tokenizer "$tokenizer" --max-num-batched-tokens "$chunk" \
    --repeat 2
model_dir=$(python3 benchmarks/llama8b_config.py "$(mktemp -d)")
wattserve serve "$model_dir" --load-format dummy --tokenizer "$tokenizer" --dtype bfloat16 \
    --max-num-seqs 256 --max-num-batched-tokens "$chunk" --max-model-len 4096 --port 8000 \
    >/tmp/serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf http://127.0.0.1:8000/ready >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -20 /tmp/serve.log; exit 1; }
    sleep 1
done
python3 benchmarks/serve_bench.py --base-url http://127.0.0.1:8000 --request-rates "$rates" \
    --arrival-seconds "$seconds" --input-len 512 --output-len 128 --vocab-size 128000 \
    --warmup-requests 4
python3 benchmarks/serve_vs_offline.py
