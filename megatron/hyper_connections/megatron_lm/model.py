"""The GPT that Megatron-LM's trainer builds, with hyper-connections when its flags ask.

``gpt_builder`` has the signature of Megatron-LM's own (``gpt_builders.py``, which lives only
in the Megatron-LM repository) and makes the same choice of layer spec from the same flags:
``--spec``, MoE (``--num-experts``: megatron-core's decoder block spec), heterogeneous layers,
or megatron-core's Transformer Engine or local layer spec. What differs is the config class,
the package's ``TransformerConfig`` (``arguments.transformer_config``), and the model class,
``GPTModel`` below, which turns the spec into its hyper-connection version when the config
asks for HC and otherwise is megatron-core's model exactly.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping
from typing import Any

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec, import_module
from megatron.training import get_args

from .. import gpt_model
from ..checkpointing import hyper_connection_state
from ..options import flag_of
from .arguments import transformer_config
from .checkpointing import check_load
from .monitoring import stability_logger

__all__ = ["GPTModel", "gpt_builder", "layer_spec"]


class GPTModel(gpt_model.GPTModel):
    """The package's ``GPTModel`` (megatron-core's arguments) in Megatron-LM's trainer.

    Before it is built, the checkpoint that ``--load`` names is checked against its config
    (``checkpointing.check_load``). When that is a residual model's checkpoint and this model
    has hyper-connections, the HC parameters stay out of the first load (its sharded state
    dict does not ask for them and ``load_state_dict`` keeps them), so they keep their
    initialisation. With HC, every forward pass in training mode is reported to the
    stability logger, which writes the metrics at Megatron-LM's log interval.
    """

    def __init__(
        self, config: Any, transformer_layer_spec: ModuleSpec, *args: Any, **kwargs: Any
    ) -> None:
        keep_hyper_connection_init = check_load(get_args(), config)
        super().__init__(config, transformer_layer_spec, *args, **kwargs)
        self._keep_hyper_connection_init = keep_hyper_connection_init
        self._stability = None
        if getattr(config, "use_hyper_connections", False):
            self._stability = stability_logger(config)
            self._stability.add_chunk(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward(*args, **kwargs)
        if self._stability is not None:
            self._stability.after_forward(self)
        return output

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> Any:
        sharded_state_dict = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self._keep_hyper_connection_init:
            for name in hyper_connection_state(self):
                sharded_state_dict.pop(f"{prefix}{name}")
        return sharded_state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, **kwargs: Any):
        if self._keep_hyper_connection_init:
            state_dict = {**state_dict, **hyper_connection_state(self)}
            self._keep_hyper_connection_init = False  # later loads are of this model's own
        return super().load_state_dict(state_dict, strict=strict, **kwargs)


def gpt_builder(
    args: argparse.Namespace,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> GPTModel:
    """One model chunk, as Megatron-LM's ``gpt_builder`` builds it, with hyper-connections when
    the flags ask for them."""
    for name in ("mtp_num_layers", "use_legacy_models"):
        if getattr(args, name, None):
            raise ValueError(
                f"{flag_of(name)} is not supported by this entry point: it builds megatron-core's "
                f"GPT without multi-token prediction; use Megatron-LM's own pretrain_gpt.py"
            )
    if config is None:
        config = transformer_config(args)
    optional = {} if pg_collection is None else {"pg_collection": pg_collection}
    return GPTModel(
        config,
        layer_spec(args, config, vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        **optional,
    )


def layer_spec(args: argparse.Namespace, config: Any, vp_stage: int | None = None) -> Any:
    """The layer (or decoder block) spec Megatron-LM picks for these flags."""
    if args.spec is not None:
        return import_module(args.spec)
    use_te = args.transformer_impl == "transformer_engine"
    if getattr(args, "experimental_attention_variant", None) is not None:
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        return get_transformer_block_with_experimental_attention_variant_spec(
            config=config, vp_stage=vp_stage
        )
    if args.num_experts:
        return gpt_layer_specs.get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=use_te,
            normalization=args.normalization,
            qk_l2_norm=args.qk_l2_norm,
            vp_stage=vp_stage,
        )
    if args.heterogeneous_layers_config_path is not None:
        from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import (
            get_gpt_heterogeneous_layer_spec,
        )

        return get_gpt_heterogeneous_layer_spec(config, use_te)
    if use_te:
        function = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    elif config.transformer_impl == "inference_optimized":
        function = gpt_layer_specs.get_gpt_layer_with_inference_spec
    else:
        function = gpt_layer_specs.get_gpt_layer_local_spec
    return function(**_config_arguments(function, config))


# Parameters of megatron-core's layer spec functions and the config fields that set them, where
# the names differ; every other parameter that names a config field takes that field's value.
_CONFIG_FIELD_OF = {"num_experts": "num_moe_experts"}


def _config_arguments(function: Any, config: Any) -> dict[str, Any]:
    """The keyword arguments of a megatron-core spec function from ``config``: the spec options
    each release's function takes (0.17 and later forward them to ``..._submodules``)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        submodules = function.__name__.removesuffix("_spec") + "_submodules"
        parameters = inspect.signature(getattr(gpt_layer_specs, submodules)).parameters
    return {
        name: getattr(config, _CONFIG_FIELD_OF.get(name, name))
        for name in parameters
        if hasattr(config, _CONFIG_FIELD_OF.get(name, name))
    }
