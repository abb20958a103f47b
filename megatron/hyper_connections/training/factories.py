"""What the trainer builds from its flags: tokenizer, megatron-core configs, model, optimizer.

Each function takes the checked flags (``checks.parse_args``) and returns what it names,
so that another entry point (``tools/generate.py``; Megatron-LM's trainer) builds
the same model from the same flags:

- ``tokenizer_from_args``: the data package's tokenizer for ``--tokenizer-type``;
- ``transformer_config``: the package's ``TransformerConfig`` (with the HC fields), whose own
  validation becomes a ``UsageError`` that names the flags;
- ``layer_spec``, ``gpt_model``, ``model_chunks``: megatron-core's layer spec, the package's
  ``GPTModel`` of one (virtual) pipeline stage, and this rank's chunks on its device and in
  its precision; ``distributed_data_parallel`` wraps them for training;
- ``optimizer_config``, ``optimizer_and_scheduler``: megatron-core's Adam (no weight decay on
  HC's connection parameters) and its ``OptimizerParamScheduler`` (of ``scheduler_values``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec

from ..gpt_model import GPTModel
from ..optimizer import hyper_connection_config_overrides
from ..options import flag_of, hyper_connection_kwargs
from .parser import UsageError, build_parser

__all__ = [
    "distributed_data_parallel",
    "gpt_model",
    "layer_spec",
    "model_chunks",
    "optimizer_and_scheduler",
    "optimizer_config",
    "scheduler_values",
    "tokenizer_from_args",
    "transformer_config",
]


def tokenizer_from_args(args: argparse.Namespace) -> Any:
    """The data package's tokenizer for ``--tokenizer-type`` and its files."""
    from megatron.hyper_connections.data.tokenizers import build_tokenizer

    model = args.tokenizer_model
    if model is not None:
        # The data package's messages call this file --tokenizer-file; name our flag first.
        path = Path(model) / "tokenizer.json" if Path(model).is_dir() else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer-model: no such file: {path}")
    return build_tokenizer(
        args.tokenizer_type,
        vocab_file=args.vocab_file,
        merges_file=args.merge_file,
        tokenizer_file=model,
    )


def transformer_config(args: argparse.Namespace) -> Any:
    """The package's ``TransformerConfig`` for ``args`` (after ``check_args``); its
    ``ValueError`` becomes an ``UsageError`` that also names the flags involved."""
    from megatron.hyper_connections import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    options: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        add_bias_linear=not args.disable_bias_linear,
        gated_linear_unit=args.swiglu,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        # On a CPU every rank builds the full weights from the same seed and keeps its shard,
        # so the initial model does not depend on the parallel layout.
        use_cpu_initialization=not torch.cuda.is_available(),
        # Megatron-LM's setting: free a stage's output once sent (it keeps its grad_fn).
        deallocate_pipeline_outputs=True,
    )
    if args.swiglu:
        options["activation_func"] = torch.nn.functional.silu
    if args.recompute_modules is not None:
        options["recompute_modules"] = args.recompute_modules
    if args.virtual_pipeline_model_parallel_size:
        # Megatron-LM's p2p setting for the interleaved schedule (batched p2p pairs messages
        # wrongly when the previous and next stage are one rank).
        options.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if args.mtp_num_layers is not None:
        options["mtp_num_layers"] = args.mtp_num_layers
        if args.mtp_loss_scaling_factor is not None:
            options["mtp_loss_scaling_factor"] = args.mtp_loss_scaling_factor
    if args.num_experts is not None:
        options["num_moe_experts"] = args.num_experts
        for flag in ("moe_router_topk", "moe_token_dispatcher_type", "moe_aux_loss_coeff"):
            if getattr(args, flag) is not None:
                options[flag] = getattr(args, flag)
    # Every HC flag has its field's default, so the config refuses one given without
    # --use-hyper-connections (or an mHC one without mHC) as it would the field.
    options.update(hyper_connection_kwargs(args))

    try:
        return TransformerConfig(**options)
    except (ValueError, AssertionError) as error:
        flags = _flags_named_in(str(error))
        raise UsageError(f"invalid model configuration: {error}{flags}") from error


def optimizer_config(args: argparse.Namespace) -> Any:
    """megatron-core's ``OptimizerConfig`` (Adam) for ``args``."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


# Config fields set by a flag of another name.
_FLAG_OF_FIELD = {
    "num_moe_experts": "--num-experts",
    "add_bias_linear": "--disable-bias-linear",
    "gated_linear_unit": "--swiglu",
    "virtual_pipeline_model_parallel_size": "--num-layers-per-virtual-pipeline-stage",
}


def _flags_named_in(message: str) -> str:
    """' (flags: --a, --b)' for the config fields that ``message`` names and a flag sets."""
    known = {option for action in build_parser()._actions for option in action.option_strings}
    flags = []
    for field in dict.fromkeys(re.findall(r"[a-z][a-z0-9_]*", message)):
        flag = _FLAG_OF_FIELD.get(field) or flag_of(field)
        if "_" in field and flag in known:
            flags.append(flag)
    return f" (flags: {', '.join(flags)})" if flags else ""


# --------------------------------------------------------------------------------------------
# Model and optimizer


def layer_spec(args: argparse.Namespace) -> ModuleSpec:
    """megatron-core's GPT layer spec for ``--transformer-impl``, ``--num-experts`` and
    ``--normalization``."""
    if args.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(num_experts=args.num_experts)
    return get_gpt_layer_local_spec(num_experts=args.num_experts, normalization=args.normalization)


def gpt_model(args: argparse.Namespace, config: Any, vp_stage: int | None = None) -> GPTModel:
    """The package's ``GPTModel`` of this rank's pipeline stage (virtual stage ``vp_stage``),
    unwrapped: what a Megatron-LM ``model_provider`` returns. With ``--mtp-num-layers`` the
    last stage holds megatron-core's MTP block, of its ordinary (residual) layers."""
    spec = layer_spec(args)
    mtp_block_spec = None
    if args.mtp_num_layers:
        mtp_block_spec = get_gpt_mtp_block_spec(
            config,
            spec,
            use_transformer_engine=args.transformer_impl == "transformer_engine",
            vp_stage=vp_stage,
        )
    return GPTModel(
        config,
        spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        mtp_block_spec=mtp_block_spec,
        vp_stage=vp_stage,
    )


def model_chunks(args: argparse.Namespace, config: Any) -> list[torch.nn.Module]:
    """This rank's model: one ``gpt_model`` per virtual pipeline stage (else the stage's), on
    this rank's GPU if there is one, in fp16/bf16 (megatron-core's ``Float16Module``) if asked.
    Not in DDP: training wraps them with ``distributed_data_parallel``, generation does not."""
    vp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp) if vp else [None]:
        model = gpt_model(args, config, vp_stage)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if args.fp16 or args.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    return chunks


def distributed_data_parallel(
    args: argparse.Namespace, config: Any, chunks: list[torch.nn.Module]
) -> list[DistributedDataParallel]:
    """``model_chunks`` in megatron-core's ``DistributedDataParallel``, which keeps the
    gradients in buffers and reduces them over the data-parallel ranks."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16,  # Megatron-LM's choice: bf16 gradients reduce in fp32
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    # Megatron-LM buckets only the first chunk's gradients for overlap; the others reduce
    # whole, when the schedule is done with them.
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def scheduler_values(args: argparse.Namespace) -> dict[str, Any]:
    """The values of megatron-core's ``OptimizerParamScheduler`` for ``args``, under the names
    of its constructor and of its state dict (which a checkpoint holds)."""
    return dict(
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )


def optimizer_and_scheduler(args: argparse.Namespace, model: list) -> tuple[Any, Any]:
    """megatron-core's Adam over ``model`` (no weight decay on HC's connection parameters)
    and its learning-rate schedule, stepped once per iteration.

    A resumed schedule takes its values from the checkpoint with
    ``--use-checkpoint-opt_param-scheduler``, else from this run's flags: with
    ``--override-opt_param-scheduler``, or when the checks found the two schedules the same
    (they refuse a resume that would change it silently)."""
    config = optimizer_config(args)
    optimizer = get_megatron_optimizer(
        config, model, config_overrides=hyper_connection_config_overrides(config)
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        **scheduler_values(args),
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=not args.use_checkpoint_opt_param_scheduler,
    )
    return optimizer, scheduler
