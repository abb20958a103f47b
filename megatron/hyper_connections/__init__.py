"""Hyper-Connections (HC), Manifold-Constrained Hyper-Connections (mHC) and Frac-Connections
for megatron-core.

The per-token math (``streams``, ``hyper_connection``, ``manifold_hyper_connection``,
``sinkhorn``, ``metrics``) is plain PyTorch and serves any model; the Megatron classes are
thin layers over it, imported on first use so that the math needs no megatron-core import.
"""

import importlib

_EXPORTS = {
    "HyperConnection": "hyper_connection",
    "HyperConnectionBase": "hyper_connection",
    "ManifoldHyperConnection": "manifold_hyper_connection",
    "expand_streams": "streams",
    "reduce_streams": "streams",
    "sinkhorn_knopp": "sinkhorn",
    "TransformerConfig": "config",
    "GPTModel": "gpt_model",
    "HyperConnectionTransformerLayer": "transformer_layer",
    "get_hyper_connection_spec": "layer_specs",
    "enable_hyper_connections": "transformer_block",
    "save_checkpoint": "checkpointing",
    "load_checkpoint": "checkpointing",
    "hyper_connection_config_overrides": "optimizer",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *__all__]
