"""``GPTModel``: megatron-core's GPT with hyper-connections when the config asks for them.

A drop-in subclass with the same constructor. Given megatron-core's standard layer specs
(local or Transformer Engine, dense or MoE) it builds hyper-connection layers when
``config.use_hyper_connections`` is set; the caller's spec is not changed. Otherwise it is
megatron-core's model exactly.

Multi-token prediction (``mtp_num_layers``, ``mtp_block_spec``): the decoder reduces its
streams before the final norm, so the MTP block receives the single-stream hidden state of a
residual decoder and its layers stay megatron-core's residual layers. At init the model, MTP
losses included, is the residual model's.
"""

from collections.abc import Mapping
from typing import Any

from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.models.gpt.gpt_model import GPTModel as MCoreGPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from .checkpointing import HC_RECORD_KEY, hyper_connection_record, pop_hyper_connection_record
from .layer_specs import get_hyper_connection_spec, has_hyper_connection_layers
from .transformer_block import enable_hyper_connections

__all__ = ["GPTModel"]


class GPTModel(MCoreGPTModel):
    """megatron-core's ``GPTModel``; see its documentation for the arguments."""

    def __init__(
        self, config: TransformerConfig, transformer_layer_spec: ModuleSpec, *args, **kwargs
    ) -> None:
        use_hc = getattr(config, "use_hyper_connections", False)
        if use_hc:
            transformer_layer_spec = get_hyper_connection_spec(transformer_layer_spec)
            if has_hyper_connection_layers(kwargs.get("mtp_block_spec")):
                # The MTP block reads the decoder's output, which is the reduced single-stream
                # state: its layers are residual layers.
                raise ValueError(
                    "mtp_block_spec has hyper-connection layers; multi-token prediction layers "
                    "are residual layers on the reduced hidden state: build the MTP block spec "
                    "from megatron-core's layer spec (get_gpt_mtp_block_spec(config, "
                    "get_gpt_layer_local_spec(), ...)), not from a hyper-connection spec"
                )
        super().__init__(config, transformer_layer_spec, *args, **kwargs)
        if use_hc:
            enable_hyper_connections(self.decoder)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """megatron-core's, plus the HC record that ``dist_checkpointing`` keeps in the
        checkpoint's common state dict (see ``checkpointing``); none without HC."""
        sharded_state_dict = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if getattr(self.config, "use_hyper_connections", False):
            sharded_state_dict[f"{prefix}{HC_RECORD_KEY}"] = hyper_connection_record(self.config)
        return sharded_state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, **kwargs):
        """megatron-core's; a loaded HC record is checked against this model and dropped."""
        state_dict = pop_hyper_connection_record(state_dict, self.config)
        return super().load_state_dict(state_dict, strict=strict, **kwargs)
