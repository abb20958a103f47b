"""Turn megatron-core layer specs into hyper-connection layer specs.

Works on whatever megatron-core's spec functions return (``get_gpt_layer_local_spec``,
``get_gpt_layer_with_transformer_engine_spec``, ``get_gpt_decoder_block_spec`` with dense and
MoE layers): the layer class is swapped for its hyper-connection subclass and everything else
(attention, MLP or MoE, norms, Transformer Engine modules) is kept as it is.
"""

import dataclasses

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from . import transformer_layer as hc_layers

__all__ = ["get_hyper_connection_spec", "has_hyper_connection_layers"]

_HC_LAYER_CLASSES = {TransformerLayer: hc_layers.HyperConnectionTransformerLayer}
if hc_layers.MoETransformerLayer is not None:
    _HC_LAYER_CLASSES[hc_layers.MoETransformerLayer] = hc_layers.HyperConnectionMoETransformerLayer


def get_hyper_connection_spec(spec: ModuleSpec | TransformerBlockSubmodules):
    """The hyper-connection version of a layer spec or a decoder block spec.

    Args:
        spec: a ``ModuleSpec`` of a ``TransformerLayer`` (or ``MoETransformerLayer``), a
            ``TransformerBlockSubmodules``, or a ``ModuleSpec`` of a ``TransformerBlock``.
    Returns:
        A spec of the same kind; specs that already use hyper-connection layers pass through.
    """
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(
            spec, layer_specs=[get_hyper_connection_spec(s) for s in spec.layer_specs]
        )
    if isinstance(spec, ModuleSpec) and isinstance(spec.module, type):
        if issubclass(spec.module, TransformerBlock):
            return dataclasses.replace(spec, submodules=get_hyper_connection_spec(spec.submodules))
        if spec.module in _HC_LAYER_CLASSES.values():
            return spec
        if spec.module in _HC_LAYER_CLASSES:
            for branch in ("self_attention", "mlp"):
                if getattr(spec.submodules, branch, IdentityOp) is IdentityOp:
                    raise ValueError(
                        f"hyper-connections wrap attention and MLP; this layer spec has no "
                        f"{branch} ({branch}=IdentityOp)"
                    )
            return dataclasses.replace(spec, module=_HC_LAYER_CLASSES[spec.module])
    module = spec.module if isinstance(spec, ModuleSpec) else spec
    if not isinstance(module, type):
        module = type(module)
    raise ValueError(
        f"cannot add hyper-connections to a spec of {module.__name__}: "
        f"expected a TransformerLayer or MoETransformerLayer ModuleSpec, or a decoder block spec"
    )


def has_hyper_connection_layers(spec: object) -> bool:
    """Whether ``spec`` (any spec tree: a ``ModuleSpec``, submodules dataclass or list) builds
    a hyper-connection layer somewhere."""
    if isinstance(spec, ModuleSpec):
        return spec.module in _HC_LAYER_CLASSES.values() or has_hyper_connection_layers(
            spec.submodules
        )
    if isinstance(spec, list | tuple):
        return any(has_hyper_connection_layers(item) for item in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return any(
            has_hyper_connection_layers(getattr(spec, field.name))
            for field in dataclasses.fields(spec)
        )
    return False
