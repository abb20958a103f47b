"""Transformer layers whose two residual connections are hyper-connections.

The layer keeps megatron-core's forward: ``_forward_attention`` and ``_forward_mlp`` are
wrapped, not rewritten. The width connection turns the n-stream state [s, b, n*C] into the
branch input h0 = H_pre X [s, b, C], which megatron-core's own code then runs through the
pre-norm and the branch. Where that code would add the branch output to its residual (the
bias-dropout-add), the depth connection takes over: y = dropout(x + bias) with the layer's
``hidden_dropout``, then X' = H_res X + H_post^T y. Linear output biases are therefore
trained and dropout is applied exactly as in the residual layer.
"""

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from .hyper_connection import DepthInputs, HyperConnection, HyperConnectionBase
from .manifold_hyper_connection import ManifoldHyperConnection
from .options import HC, kind_of, module_kwargs

try:  # megatron-core >= 0.16
    from megatron.core.transformer.transformer_layer import MoETransformerLayer
except ImportError:  # pragma: no cover
    MoETransformerLayer = None

__all__ = ["HyperConnectionTransformerLayer", "build_hyper_connection"]


def build_hyper_connection(config, sublayer_index: int) -> HyperConnectionBase:
    """The HC or mHC module that ``config`` asks for, for sublayer ``sublayer_index``.

    Sublayers are counted as the HC paper does: attention of layer l (0-based) is 2l, its MLP
    is 2l + 1. Parameters are replicated over tensor-parallel ranks; under sequence
    parallelism each rank sees a slice of the tokens, so their gradients are marked for
    megatron-core's all-reduce over the tensor-parallel group.
    """
    device = None if config.use_cpu_initialization else torch.cuda.current_device()
    module_class = HyperConnection if kind_of(config) == HC else ManifoldHyperConnection
    module = module_class(
        config.hidden_size,
        layer_index=sublayer_index,
        eps=config.layernorm_epsilon,
        device=device,
        **module_kwargs(config),
    )
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel
    if config.hyper_connections_compile:
        module.compile_coefficients()
    if config.hyper_connections_fused_kernels:
        module.use_fused_kernels()
    return module


class _HyperConnectionBDA:
    """Stands in for a layer's bias-dropout-add (same call signature).

    megatron-core calls ``bda(training, fused)(output_with_bias, residual, prob)`` with the
    residual it was given, which for this layer is the branch input h0. The n-stream state
    and its coefficients (``depth_inputs``) were kept by the width connection; they are
    consumed here by the depth connection.
    """

    def __init__(self, hyper_connection: HyperConnectionBase) -> None:
        self.hyper_connection = hyper_connection
        self.depth_inputs: DepthInputs | None = None

    def seed(self) -> int | None:
        """The fused backend's dropout seed: from torch's CPU generator, which megatron seeds
        alike on the ranks of a tensor-parallel group, so offset by the rank there: under
        sequence parallelism each rank holds other tokens and needs its own mask (megatron's
        own bias-dropout-add forks its model-parallel RNG for the same reason)."""
        if not self.hyper_connection.backend.uses_dropout_seed:
            return None
        seed = int(torch.randint(2**31 - 1, ()))
        return (seed + 7919 * parallel_state.get_tensor_model_parallel_rank()) % (2**31 - 1)

    def __call__(self, training: bool, fused: bool):
        del fused  # megatron's fused bias-dropout-add; the fused backend has its own kernel

        def merge(output_with_bias: tuple[Tensor, Tensor | None], _branch_input, prob: float):
            output, bias = output_with_bias
            inputs, self.depth_inputs = self.depth_inputs, None
            hidden_dropout = prob if training else 0.0
            seed = self.seed() if hidden_dropout > 0.0 else None
            return self.hyper_connection.depth_connection(
                output, inputs, bias=bias, hidden_dropout=hidden_dropout, seed=seed
            )

        return merge


class HyperConnectionTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer`` on the n-stream state [s, b, n*C].

    Exposes ``hyper_conn_attn`` and ``hyper_conn_mlp`` (with ``get_log_amax()``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        sublayer = 2 * (self.layer_number - 1)
        self.hyper_conn_attn = build_hyper_connection(self.config, sublayer)
        self.hyper_conn_mlp = build_hyper_connection(self.config, sublayer + 1)
        self.self_attn_bda = _HyperConnectionBDA(self.hyper_conn_attn)
        self.mlp_bda = _HyperConnectionBDA(self.hyper_conn_mlp)

    def _forward_attention(self, hidden_states: Tensor, *args, **kwargs):
        branch_input, self.self_attn_bda.depth_inputs = self.hyper_conn_attn.width_connection(
            hidden_states
        )
        return super()._forward_attention(branch_input, *args, **kwargs)

    def _forward_mlp(self, hidden_states: Tensor, *args, **kwargs):
        branch_input, self.mlp_bda.depth_inputs = self.hyper_conn_mlp.width_connection(
            hidden_states
        )
        return super()._forward_mlp(branch_input, *args, **kwargs)


if MoETransformerLayer is not None:

    class HyperConnectionMoETransformerLayer(HyperConnectionTransformerLayer, MoETransformerLayer):
        """megatron-core's ``MoETransformerLayer`` with hyper-connections."""

    __all__.append("HyperConnectionMoETransformerLayer")
