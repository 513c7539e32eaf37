#!/usr/bin/env bash
# The online benchmark on one GPU: wattserve serving Llama-3.1-8B shapes (random bf16
# weights) over HTTP on loopback, loaded by serve_bench.py at increasing Poisson request rates.
#
# Usage: benchmarks/serve_h100.sh TOKENIZER_DIR [RATES] [PROMPTS_PER_RATE] [MAX_BATCHED_TOKENS]
# Writes benchmarks/results/serve_<gpu>.json and .png; the server's log goes to /tmp/serve.log.
set -euo pipefail
cd "$(dirname "$0")/.."
tokenizer=$1
rates=${2:-4,8,12,16,20,24}
prompts=${3:-120}
chunk=${4:-2048}
model_dir=$(python3 benchmarks/llama8b_config.py "$(mktemp -d)")
wattserve serve "$model_dir" --load-format dummy --tokenizer "$tokenizer" --dtype bfloat16 \
    --max-num-seqs 256 --max-num-batched-tokens "$chunk" --max-model-len 4096 --port 8000 \
    >/tmp/serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf http://127.0.0.1:8000/health >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -20 /tmp/serve.log; exit 1; }
    sleep 1
done
python3 benchmarks/serve_bench.py --base-url http://127.0.0.1:8000 --request-rates "$rates" \
    --num-prompts "$prompts" --input-len 512 --output-len 128 --vocab-size 128000 --warmup-requests 4
