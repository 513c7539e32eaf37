#!/usr/bin/env bash
# What waits for a GPU: kernels built and tested on CPU (Triton's interpreter, sm_90 SASS)
# that have not run compiled, and the runs that decide the switches keeping them off.
# One H200 session, in this order, a device call a step:
#
#   benchmarks/gpu_pending.sh tests          compiled kernels against their twins and references
#   benchmarks/gpu_pending.sh kernels        decide DECODE_CODE_PAIRS, U4_BF16X2, ACT_FP8_PIPELINED
#                                            (and time the fp8 KV write)
#   benchmarks/gpu_pending.sh models TOK     decide NORM_WRITES_FP8; decode and prefill by weight
#                                            format (issue 20), MoE (19)
#   benchmarks/gpu_pending.sh long TOK       8k/32k/130k contexts by KV dtype (issue 23)
#
# The switches (off until a run shows they win):
# - kernels/triton_attention_decode.py DECODE_CODE_PAIRS: fp8/int8 decode reads codes as
#   int16 pairs. kv_quant_kernel_bench prints a "+pairs" row beside each default one.
# - kernels/triton_quant_gemv.py U4_BF16X2: the int4 GEMV on packed bf16 pairs.
#   quant_gemv_bench prints a bf16x2 row beside each float32 one.
# - kernels/triton_activation.py ACT_FP8_PIPELINED: the fp8 prefill's act-and-mul + quantize
#   as a persistent cp.async-pipelined kernel. act_fp8_bench times it (a grid of warps and
#   stages) against the one-row kernel and the copy, and checks both bit for bit.
# - kernels/triton_quant_linear.py NORM_WRITES_FP8: the norm before an fp8 linear writes its
#   e4m3 codes and scales. weight_quant_bench prints an fp8+normfp8 row beside fp8's.
# Where a test fails, leave its switch off; where the switch's row is faster and its tests
# pass, turn it on (then rerun `models`). Results go to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
case ${1:-} in
tests)
    pytest -q tests/test_quant_gemv_bf16x2.py tests/test_triton_kv_quant.py tests/test_quant_linear.py \
        tests/test_pdl.py tests/test_triton_moe.py tests/test_act_fp8_pipelined.py
    pytest -q tests/test_triton_kernels.py -k decode ;;
kernels)
    python benchmarks/kv_quant_kernel_bench.py --dtypes auto,fp8_e4m3,int8,int4,int2
    python benchmarks/quant_gemv_bench.py --sweep --formats fp8,int4_g128,q4_0_g32
    python benchmarks/act_fp8_bench.py ;;
models)
    tok=${2:?tokenizer dir}
    python benchmarks/weight_quant_bench.py --tokenizer "$tok" --skip-perplexity
    python benchmarks/moe_bench.py --tokenizer "$tok" --skip-layer ;;
long)
    python benchmarks/long_context_bench.py --tokenizer "${2:?tokenizer dir}" ;;
*)
    sed -n 2,24p "$0"; exit 2 ;;
esac
