"""Compute kernels: Triton on CUDA, each with a PyTorch reference (`*_ref`) that is the CPU
path and the test oracle. `kernels.dispatch` is the one place that picks between them."""
