"""The hyper-connection flags in Megatron-LM's parser, and the config built from its arguments.

The flags are the package's options (``options.add_hyper_connection_arguments``: one per
``TransformerConfig`` field, the field's default as the flag's), added through Megatron-LM's
``extra_args_provider``, plus ``--log-mhc-amax``, which only the trainers read. Megatron-LM's
``core_transformer_config_from_args`` copies every field of the config class it is given from
the arguments of the same name, so the HC fields reach the config unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from megatron.training.arguments import core_transformer_config_from_args

from ..config import TransformerConfig
from ..options import add_hyper_connection_arguments, flag_of

__all__ = ["LOG_MHC_AMAX", "add_arguments", "extra_args_provider", "transformer_config"]

LOG_MHC_AMAX = "--log-mhc-amax"

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

# Megatron-LM flags that build no config or model with hyper-connections in them: with
# --use-hyper-connections they are refused, since the HC flags would be ignored.
_NOT_WITH_HYPER_CONNECTIONS = {
    "multi_latent_attention": "Megatron-LM then builds an MLATransformerConfig, which has no "
    "hyper-connection options",
    "heterogeneous_layers_config_path": "Megatron-LM then builds a "
    "HeterogeneousTransformerConfig, which has no hyper-connection options",
    "yaml_cfg": "the config then comes from the YAML file, not from the flags",
    "experimental_attention_variant": "its layers are not wrapped by hyper-connections",
    "use_legacy_models": "the legacy GPT model has no hyper-connections",
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider``: the HC flags Megatron-LM does not define, and
    ``--log-mhc-amax``."""
    group = add_hyper_connection_arguments(parser)
    if LOG_MHC_AMAX not in parser._option_string_actions:
        group.add_argument(
            LOG_MHC_AMAX,
            action="store_true",
            help="also log hyper-connections/log_amax/...: the log of the largest singular "
            "value of each sublayer's token-averaged H_res",
        )
    return parser


def extra_args_provider(other: ArgsProvider | None = None) -> ArgsProvider:
    """An ``extra_args_provider`` that adds ``other``'s arguments (e.g. ModelOpt's), then the
    HC flags."""

    def provide(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if other is not None:
            parser = other(parser)
        return add_arguments(parser)

    return provide


def transformer_config(args: argparse.Namespace):
    """Megatron-LM's ``core_transformer_config_from_args`` with the package's
    ``TransformerConfig``; with ``--use-hyper-connections``, a flag under which Megatron-LM
    would build no HC model is refused, naming it."""
    if getattr(args, "use_hyper_connections", False):
        for name, reason in _NOT_WITH_HYPER_CONNECTIONS.items():
            value = getattr(args, name, None)
            if value:
                raise ValueError(
                    f"{flag_of('use_hyper_connections')} is not supported with "
                    f"{flag_of(name)}={value!r}: {reason}; leave out one of them"
                )
    return core_transformer_config_from_args(args, config_class=TransformerConfig)
