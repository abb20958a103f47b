"""A megatron-core ``TransformerBlock`` of hyper-connection layers: the streams' expansion and
reduction, and the optional recomputation of states.

The block's layers carry the n-stream state [s, b, n*C]. The decoder input is copied into the
n streams where it enters the first layer (on the first pipeline stage only) and the streams
are averaged right before the final norm (on the last stage only). Every pipeline stage
boundary in between carries the full state, so any pipeline layout is the same model.

megatron-core's ``GPTModel`` builds a plain ``TransformerBlock``; rather than rebuilding it
(which would change parameter initialisation), ``enable_hyper_connections`` installs the two
steps on that block with forward pre-hooks, PyTorch's extension point for exactly this.
"""

from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor

from .autograd import StateChain
from .streams import expand_streams, reduce_streams

__all__ = ["enable_hyper_connections"]


def enable_hyper_connections(block: TransformerBlock) -> None:
    """Make a block of hyper-connection layers expand its input to n streams, reduce them at
    its end, and (``config.recompute_hyper_connections``) share one state chain."""
    if getattr(block, "_hyper_connections_enabled", False):
        raise RuntimeError("enable_hyper_connections was already applied to this block")
    block._hyper_connections_enabled = True
    config = block.config
    if config.recompute_hyper_connections:
        _share_state_chain(block)
    num_streams = config.num_residual_streams
    if num_streams == 1:
        return  # Frac-Connections and n = 1 keep the [s, b, C] layout

    def expand_input(module: TransformerBlock, args: tuple, kwargs: dict):
        if not module.pre_process:
            return None  # later stages receive the expanded state from the previous stage
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        expanded = expand_streams(hidden_states, num_streams)
        if args:  # stays positional: as a keyword it would clash with attention_mask & co.
            return (expanded, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": expanded}

    block.register_forward_pre_hook(expand_input, with_kwargs=True)

    if block.final_layernorm is not None:
        block.final_layernorm.register_forward_pre_hook(
            lambda _norm, args: (reduce_streams(args[0], num_streams), *args[1:])
        )
    elif block.post_process:
        block.register_forward_hook(
            lambda _block, _args, output: reduce_streams(output, num_streams)
        )


def _share_state_chain(block: TransformerBlock) -> None:
    connections = [
        hc for layer in block.layers for hc in (layer.hyper_conn_attn, layer.hyper_conn_mlp)
    ]
    block_size = block.config.hyper_connections_recompute_block_size
    if block_size is None:  # one kept state per n layers (see the config field)
        block_size = 2 * block.config.num_residual_streams
    chain = StateChain(block_size)
    for position, hc in enumerate(connections):
        hc.use_state_chain(chain, position)
