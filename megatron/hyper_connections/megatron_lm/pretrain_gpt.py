"""Megatron-LM's GPT pretraining with hyper-connections.

    torchrun --nproc-per-node 8 -m megatron.hyper_connections.megatron_lm.pretrain_gpt \\
        <Megatron-LM's pretrain_gpt.py flags> \\
        --use-hyper-connections --num-residual-streams 4 [--use-manifold-hyper-connections]

(``megatron-hc-pretrain-gpt`` is the same as a console script.) Everything but the model is
Megatron-LM's, from ``megatron.training``: its parser and validation, ``pretrain`` with its
training loop, evaluation, checkpointing (``--save``, ``--load``, async saves), logging
(console, TensorBoard, W&B), signal handling, NaN checks and fault tolerance, and megatron-core's
datasets (``--mock-data`` or ``--data-path``). Megatron-LM's ``pretrain_gpt.py`` lives only in
its repository; this module is the same recipe: a batch from the data iterator, the model's
per-token losses, their masked sum as the loss (checked for NaN, Inf and spikes by Megatron-LM's
rerun state machine as its flags ask), and megatron-core's GPT datasets. The model comes from
``model.gpt_builder``: Megatron-LM's own without the HC flags.

Not served: supervised fine-tuning (``--sft``), fill-in-the-middle data (``--fim-data``),
packed sequences and multi-token prediction; Megatron-LM's ``pretrain_gpt.py`` has them.
"""

from __future__ import annotations

import argparse
import inspect
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank
from megatron.training import get_args, get_timers, get_tokenizer, inprocess_restart, training
from megatron.training.utils import get_blend_and_blend_per_split

from ..cpu_compat import enable_cpu_megatron_training
from ..options import flag_of
from .arguments import extra_args_provider
from .model import gpt_builder

__all__ = ["forward_step", "main", "model_provider", "train_valid_test_datasets_provider"]

ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}
"""Defaults of Megatron-LM's ``pretrain_gpt.py`` for flags that have none."""

SPIKY_LOSS_FACTOR = 10
"""``--check-for-spiky-loss``: a loss this many times the largest seen so far is a spike."""

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def main() -> None:
    """The command line: Megatron-LM's GPT pretraining, with the HC flags."""
    enable_cpu_megatron_training()  # a no-op with CUDA
    _use_prebuilt_dataset_helpers()
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(training.pretrain)
    steps = dict(
        train_valid_test_dataset_provider=train_valid_test_datasets_provider,
        model_provider=model_provider,
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=forward_step,
        store=store,
    )
    if "cfg_container" in inspect.signature(training.pretrain).parameters:
        # megatron-core 0.18 and later: the arguments are parsed first, into a config container.
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(
            extra_args_provider=extra_args_provider(), args_defaults=ARGS_DEFAULTS
        )
        with warnings.catch_warnings():
            # ...which recommends a model config over a model provider; a provider it is.
            warnings.filterwarnings("ignore", "It is recommended to use a ModelConfig")
            container = pretrain_cfg_container_from_args(args)
        pretrain(container, **steps)
    else:
        pretrain(extra_args_provider=extra_args_provider(), args_defaults=ARGS_DEFAULTS, **steps)


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> torch.nn.Module:
    """Megatron-LM's model provider: one chunk of the GPT (``model.gpt_builder``)."""
    return gpt_builder(get_args(), pre_process, post_process, vp_stage, config, pg_collection)


def forward_step(data_iterator: Iterator | None, model: torch.nn.Module) -> tuple:
    """Megatron-LM's forward-step function: the model's per-token losses on the next batch and
    how to reduce them."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(loss_func, batch["loss_mask"])


def get_batch(data_iterator: Iterator | None, vp_stage: int | None) -> dict[str, Any]:
    """The next micro-batch on this rank's device, cut to its part of the sequence under
    context parallelism; all None on the stages that take no data. Every tensor-parallel rank
    reads the batch itself (``is_dataset_built_on_rank``): no broadcast from the first one."""
    if not _takes_data(vp_stage):
        return dict.fromkeys(_BATCH_KEYS)
    loaded = next(data_iterator)
    batch = {
        key: loaded[key].cuda(non_blocking=True) if key in loaded else None for key in _BATCH_KEYS
    }
    if parallel_state.get_context_parallel_world_size() > 1:
        parameters = inspect.signature(get_batch_on_this_cp_rank).parameters
        # megatron-core 0.19 asks whether context parallelism is hybrid; earlier ones do not.
        batch = get_batch_on_this_cp_rank(
            batch, **({"is_hybrid_cp": False} if "is_hybrid_cp" in parameters else {})
        )
    return batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple:
    """megatron-core's three-value loss: the sum of the per-token losses over the unmasked
    tokens, their count, and both for logging (``lm loss``); checked by Megatron-LM's rerun
    state machine for NaN and Inf (``--check-for-nan-in-loss-and-grad``) and spikes
    (``--check-for-spiky-loss``)."""
    args = get_args()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for rejection, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun_state_machine.validate_result(
                result=loss,
                rejection_func=rejection,
                message=f"found {what} in local forward loss calculation",
                tolerance=0.0,  # the forward pass is deterministic
                fatal=True,
            )
    if getattr(args, "check_for_spiky_loss", False):
        rerun_state_machine.validate_result(
            result=loss,
            rejection_func=partial(
                rerun_state_machine.is_unexpectedly_large,
                threshold=SPIKY_LOSS_FACTOR,
                context="loss",
            ),
            message="Spiky loss",
            tolerance=0.0,
            fatal=False,
        )
    report = torch.stack([loss.detach(), num_tokens.to(loss.dtype)])
    return loss, num_tokens, {"lm loss": report}


def train_valid_test_datasets_provider(
    train_val_test_num_samples: list[int], vp_stage: int | None = None
) -> tuple:
    """megatron-core's GPT datasets (``MockGPTDataset`` with ``--mock-data``) of the sizes
    Megatron-LM asks for, built on the ranks that read data."""
    args = get_args()
    for name in ("sft", "fim_data"):
        if getattr(args, name, False):
            raise ValueError(
                f"{flag_of(name)} is not supported by this entry point, which pretrains on GPT "
                f"datasets: use Megatron-LM's own pretrain_gpt.py"
            )
    return BlendedMegatronDatasetBuilder(
        MockGPTDataset if args.mock_data else GPTDataset,
        train_val_test_num_samples,
        partial(_takes_data, vp_stage),
        gpt_dataset_config(args),
    ).build()


# Megatron-LM's data loaders ask each rank's datasets provider for its own datasets.
train_valid_test_datasets_provider.is_distributed = True


def gpt_dataset_config(args: argparse.Namespace) -> GPTDatasetConfig:
    """megatron-core's GPT dataset config from Megatron-LM's data flags (those that the
    installed megatron-core's config has)."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    values = {
        "random_seed": args.seed,
        "sequence_length": args.seq_length,
        "blend": blend,
        "blend_per_split": blend_per_split,
        "split": args.split,
        "num_dataset_builder_threads": args.num_dataset_builder_threads,
        "path_to_cache": args.data_cache_path,
        "mmap_bin_files": args.mmap_bin_files,
        "tokenizer": get_tokenizer(),
        "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask,
        "eod_mask_loss": args.eod_mask_loss,
        "create_attention_mask": args.create_attention_mask_in_dataloader,
        "object_storage_cache_path": getattr(args, "object_storage_cache_path", None),
        "mid_level_dataset_surplus": getattr(args, "mid_level_dataset_surplus", None),
    }
    fields = GPTDatasetConfig.__dataclass_fields__
    return GPTDatasetConfig(
        **{name: value for name, value in values.items() if name in fields and value is not None}
    )


def _takes_data(vp_stage: int | None = None) -> bool:
    """Whether this rank's model chunk ``vp_stage`` reads data: the first and the last stage
    (tokens, positions; labels, loss mask), on every tensor-parallel rank."""
    return parallel_state.is_pipeline_first_stage(
        ignore_virtual=vp_stage is None, vp_stage=vp_stage
    ) or parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def _use_prebuilt_dataset_helpers() -> None:
    """megatron-core's wheels ship the dataset helpers compiled, without the Makefile that
    Megatron-LM's start-up runs ``make`` with (and exits when that fails); with the compiled
    helpers importable there is nothing to build, so the build is skipped."""
    from megatron.core.datasets import utils

    if (Path(utils.__file__).parent / "Makefile").exists():
        return  # a Megatron-LM checkout: Megatron-LM builds them as usual
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    utils.compile_helpers = lambda: None


if __name__ == "__main__":
    main()
