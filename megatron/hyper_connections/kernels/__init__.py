"""Fused Triton kernels of (m)HC, one module per fused operation, like megatron-core's
``fusions``:

- ``rms_projection``: x phi and 1 / RMS(x) in one pass over the state, and its backward.
- ``mhc_coefficients``: mHC's H_pre, H_post, H_res from the projection (an autograd function).
- ``mhc_lite_coefficients``: the same for mHC-lite (H_res a softmax mixture of permutations).
- ``branch_input``: the width connection's h0 = H_pre X, and its backward.
- ``merge_branch_output``: the depth connection's X' = H_res X + H_post^T y merged with the
  bias-dropout-add, and its backward.

Apart from them: ``availability`` (whether Triton and given tensors can run them; importing it
never needs Triton), ``triton_utils`` (shared Triton helpers) and ``ops`` (the fused backend's
dispatch onto the kernels). The kernel modules and ``ops`` import Triton; this package does
not. The PyTorch counterparts are in ``projection``, ``streams`` and
``manifold_hyper_connection``; ``backends`` says which a module runs. Layout and symbols as in
``streams``; coefficients in fp32, states and branch outputs in fp32, bf16 or fp16.
"""
