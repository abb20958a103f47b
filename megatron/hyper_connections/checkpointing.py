"""Distributed checkpoints of models with hyper-connections (megatron-core ``dist_checkpointing``).

HC parameters need nothing special: megatron-core's default sharded state dict
(``MegatronModule.sharded_state_dict`` -> ``make_sharded_tensors_for_checkpoint``) stores every
parameter of a plain ``nn.Module`` as a replicated ``ShardedTensor`` with replica id
``(0, tp_rank, dp_rank)``, so TP rank 0 of each data-parallel replica writes it, and the
decoder block stacks it over layers with the global layer offset, so any TP/PP layout reads it.

What the tensors do not tell is how the model used them: ``GPTModel.sharded_state_dict`` adds
a small plain dict, the *HC record* (``hyper_connection_record``), which ``dist_checkpointing``
keeps in its common state dict (``common.pt``, written by rank 0). ``load_checkpoint`` reads it
first and refuses a checkpoint of another variant or stream count before any tensor is read;
``GPTModel.load_state_dict`` checks and drops it, so megatron's own loaders work unchanged.
A checkpoint without a record is a residual model's (megatron-core's ``GPTModel`` writes none),
and loading it into an HC model is supported: the HC parameters keep their residual-equivalent
initialisation, so the model continues with the residual model's logits.
"""

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from .hyper_connection import HyperConnectionBase
from .options import hyper_connection_options, hyper_connection_variant, must_match_fields

__all__ = [
    "HC_RECORD_KEY",
    "check_hyper_connection_record",
    "hyper_connection_record",
    "hyper_connection_state",
    "hyper_connection_variant",
    "load_checkpoint",
    "pop_hyper_connection_record",
    "save_checkpoint",
]

HC_RECORD_KEY = "hyper_connections"
"""Key of the HC record in a model's sharded state dict and in the checkpoint's common dict."""

# A megatron-core config has no HC fields: it records their defaults (a residual model).
_DEFAULTS = {field.name: field.default for field, _ in hyper_connection_options()}


def hyper_connection_record(config: Any) -> dict[str, Any]:
    """The HC configuration stored with a checkpoint (plain types: ``torch.load`` reads it with
    ``weights_only=True``): the variant and every option declared ``must_match``."""
    record = {
        "use_hyper_connections": bool(getattr(config, "use_hyper_connections", False)),
        "variant": hyper_connection_variant(config),
    }
    for name in must_match_fields():
        record[name] = getattr(config, name, _DEFAULTS[name])
    return record


def check_hyper_connection_record(
    record: Mapping[str, Any] | None, config: Any, source: str = "the checkpoint"
) -> None:
    """Raise ``ValueError`` unless a checkpoint with HC record ``record`` (None: a residual
    model's) can be loaded into a model built from ``config``.

    A residual checkpoint loads into any model (HC parameters keep their init); otherwise the
    variant and every option declared ``must_match`` (see ``options``) must agree.
    """
    if _is_residual(record):
        return
    expected = hyper_connection_record(config)
    # A record has the fields that were declared when it was written (a later declaration is
    # not compared against a checkpoint that predates it).
    differences = [
        f"checkpoint has {name}={record[name]!r}, the model has {name}={expected[name]!r}"
        for name in ("variant", *must_match_fields())
        if name in record and record[name] != expected[name]
    ]
    if differences:
        raise ValueError(f"cannot load {source} into this model: {'; '.join(differences)}")


def pop_hyper_connection_record(state_dict: Mapping[str, Any], config: Any) -> Mapping[str, Any]:
    """``state_dict`` without its HC record (a shallow copy if it had one), after checking the
    record against ``config``; for ``load_state_dict`` overrides."""
    if HC_RECORD_KEY not in state_dict:
        return state_dict
    state_dict = copy.copy(state_dict)  # keeps torch's `_metadata` attribute
    check_hyper_connection_record(state_dict.pop(HC_RECORD_KEY), config, "the state dict")
    return state_dict


def save_checkpoint(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module], checkpoint_dir: str | Path
) -> None:
    """Save model chunks (possibly DDP- or Float16Module-wrapped) with ``dist_checkpointing``,
    under megatron's keys ``model`` (one chunk) or ``model0``, ``model1``, ... Collective."""
    chunks = _named_chunks(model_chunks)
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    state = {key: chunk.sharded_state_dict() for key, chunk in chunks.items()}
    dist_checkpointing.save(state, str(checkpoint_dir))


def load_checkpoint(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module], checkpoint_dir: str | Path
) -> None:
    """Load a ``save_checkpoint`` checkpoint into model chunks of any TP/PP layout. Collective.

    Raises ``ValueError``, before reading any tensor, when the checkpoint's HC configuration
    does not fit the model (see ``check_hyper_connection_record``).
    """
    chunks = _named_chunks(model_chunks)
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    records = {key: (common.get(key) or {}).get(HC_RECORD_KEY) for key in chunks}
    for key, chunk in chunks.items():
        check_hyper_connection_record(records[key], chunk.config, f"checkpoint {checkpoint_dir}")

    # A residual checkpoint has no HC tensors: request the others, keep the HC init.
    keep = {
        key: hyper_connection_state(chunk) if _is_residual(records[key]) else {}
        for key, chunk in chunks.items()
    }
    request = {
        key: {k: v for k, v in chunk.sharded_state_dict().items() if k not in keep[key]}
        for key, chunk in chunks.items()
    }
    loaded = dist_checkpointing.load(request, str(checkpoint_dir))
    for key, chunk in chunks.items():
        chunk.load_state_dict({**loaded[key], **keep[key]})


def _named_chunks(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
) -> dict[str, torch.nn.Module]:
    """Unwrapped chunks under the keys megatron's training loop uses: ``model`` or ``model0``,
    ``model1``, ..."""
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    # Wrappers (DDP, Float16Module) would prefix the keys with `module.`, as megatron's
    # training loop also avoids by unwrapping first.
    chunks = unwrap_model(list(model_chunks))
    if len(chunks) == 1:
        return {"model": chunks[0]}
    return {f"model{i}": chunk for i, chunk in enumerate(chunks)}


def _is_residual(record: Mapping[str, Any] | None) -> bool:
    return record is None or not record["use_hyper_connections"]


def hyper_connection_state(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The chunk's HC parameters (detached), under their state-dict keys: what a model keeps at
    its initialisation when it loads a residual checkpoint."""
    return {
        f"{name}.{param_name}": param.detach()
        for name, module in chunk.named_modules()
        if isinstance(module, HyperConnectionBase)
        for param_name, param in module.named_parameters()
    }
