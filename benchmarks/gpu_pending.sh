#!/usr/bin/env bash
# What waits for a GPU: kernels built and tested on CPU (Triton's interpreter, sm_90 SASS)
# that have not run compiled, and the runs that decide the switches keeping them off.
# One H200 session, in this order, a device call a step:
#
#   benchmarks/gpu_pending.sh tests          compiled kernels against their twins and references
#   benchmarks/gpu_pending.sh kernels        decide DECODE_CODE_PAIRS and U4_BF16X2; the fp8 write
#   benchmarks/gpu_pending.sh models TOK     decode and prefill by weight format (issue 20), MoE (19)
#   benchmarks/gpu_pending.sh long TOK       8k/32k/130k contexts by KV dtype (issue 23)
#
# The switches (off until a run shows they win):
# - kernels/triton_attention_decode.py DECODE_CODE_PAIRS: fp8/int8 decode reads codes as
#   int16 pairs. kv_quant_kernel_bench prints a "+pairs" row beside each default one.
# - kernels/triton_quant_gemv.py U4_BF16X2: the int4 GEMV on packed bf16 pairs.
#   quant_gemv_bench prints a bf16x2 row beside each float32 one.
# Where a test fails, leave its switch off; where a "+pairs" or bf16x2 row is faster and its
# tests pass, turn the switch on and rerun `models`. Results go to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
case ${1:-} in
tests)
    pytest -q tests/test_quant_gemv_bf16x2.py tests/test_triton_kv_quant.py tests/test_quant_linear.py \
        tests/test_pdl.py tests/test_triton_moe.py
    pytest -q tests/test_triton_kernels.py -k decode ;;
kernels)
    python benchmarks/kv_quant_kernel_bench.py --dtypes auto,fp8_e4m3,int8,int4,int2
    python benchmarks/quant_gemv_bench.py --sweep --formats fp8,int4_g128,q4_0_g32 ;;
models)
    tok=${2:?tokenizer dir}
    python benchmarks/weight_quant_bench.py --tokenizer "$tok" --skip-perplexity
    python benchmarks/moe_bench.py --tokenizer "$tok" --skip-layer ;;
long)
    python benchmarks/long_context_bench.py --tokenizer "${2:?tokenizer dir}" ;;
*)
    sed -n 2,17p "$0"; exit 2 ;;
esac
