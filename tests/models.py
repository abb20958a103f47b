"""Tiny GPT models from megatron-core's own specs, batches and training steps for every test."""

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.models.gpt.gpt_model import GPTModel as MCoreGPTModel

from megatron.hyper_connections import GPTModel, TransformerConfig

TINY = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    use_cpu_initialization=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    add_bias_linear=True,
    params_dtype=torch.float32,
    pipeline_dtype=torch.float32,
)
VOCAB, SEQ, BATCH = 64, 16, 2

# The variants whose behaviour matters to users.
VARIANTS = {
    "DHCx2": dict(num_residual_streams=2),
    "DHCx4": dict(num_residual_streams=4),
    "DHCx4-notanh": dict(num_residual_streams=4, hyper_connections_tanh=False),
    "SHCx2": dict(num_residual_streams=2, hyper_connections_dynamic=False),
    "SHCx4": dict(num_residual_streams=4, hyper_connections_dynamic=False),
    "mHCx4": dict(num_residual_streams=4, use_manifold_hyper_connections=True),
    "mHCx4-log": dict(
        num_residual_streams=4, use_manifold_hyper_connections=True, mhc_log_domain_sinkhorn=True
    ),
    "mHCx2-3proposals": dict(
        num_residual_streams=2,
        use_manifold_hyper_connections=True,
        mhc_num_dynamic_alpha_proposals=3,
    ),
    "mHCx4-lite": dict(
        num_residual_streams=4,
        use_manifold_hyper_connections=True,
        mhc_h_res_parameterization="permutations",
    ),
    "Frac4": dict(num_fracs=4),
}


def make_config(hc: dict | None = None, **overrides: Any) -> TransformerConfig:
    """TINY with ``overrides``; ``hc`` (e.g. a VARIANTS entry) turns hyper-connections on."""
    options = {**TINY, **overrides}
    if hc is not None:
        options.update(use_hyper_connections=True, **hc)
    return TransformerConfig(**options)


def build_gpt(
    config: TransformerConfig,
    seed: int | None = 1234,
    model_cls: type = GPTModel,
    spec: Any = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """A GPT with deterministic init (same seed, same megatron-core weights); ``seed=None``
    keeps the current RNG state."""
    if seed is not None:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if spec is None:
        spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts)
    if config.mtp_num_layers and "mtp_block_spec" not in kwargs:
        # megatron-core's MTP block of residual layers (also for an HC decoder), with rotary
        # positions as MTP models use: under pipeline parallelism the MTP stage's copy of
        # learned absolute position embeddings is not kept in sync with the first stage's.
        kwargs.setdefault("position_embedding_type", "rope")
        kwargs["mtp_block_spec"] = get_gpt_mtp_block_spec(
            config,
            get_gpt_layer_local_spec(num_experts=config.num_moe_experts),
            use_transformer_engine=False,
            vp_stage=kwargs.get("vp_stage"),
        )
    return model_cls(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, **kwargs)


def perturb_hyper_connections(model: torch.nn.Module, seed: int = 17, scale: float = 0.1) -> None:
    """Move every HC parameter off its init (deterministically), so that every coefficient
    path matters in a comparison."""
    from megatron.hyper_connections.hyper_connection import HyperConnectionBase

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HyperConnectionBase):
                for param in module.parameters():
                    param.add_(scale * torch.randn(param.shape, generator=generator).to(param))


def build_baseline(seed: int = 1234, **overrides: Any) -> MCoreGPTModel:
    """megatron-core's own GPTModel with megatron-core's own config."""
    from megatron.core.transformer.transformer_config import TransformerConfig as MCoreConfig

    return build_gpt(MCoreConfig(**{**TINY, **overrides}), seed, model_cls=MCoreGPTModel)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return tokens, positions


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    tokens, positions = batch(seed)
    return model(tokens, positions, None)


def lm_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
    }


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # No explicit mask: the local spec's causal attention builds its own.
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token.float().mean()


def forward_step(data: Iterator, model: torch.nn.Module) -> tuple:
    """A forward step for megatron-core's pipeline schedules."""
    batch = next(data)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(per_token: torch.Tensor) -> tuple:
        loss = per_token.float().mean()
        # megatron-core divides the returned loss in place by the number of microbatches.
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def train_step(model: Any, batches: list[dict[str, torch.Tensor]], **kwargs: Any) -> list[float]:
    """One forward/backward over ``batches`` as microbatches with megatron-core's schedule;
    ``model`` is a module or a list of virtual-stage chunks. Returns per-microbatch losses
    (on the last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model if isinstance(model, list) else [model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
        **kwargs,
    )
    return [float(out["lm loss"]) for out in losses]


def ddp(model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(model.config, DistributedDataParallelConfig(**ddp_kwargs), model)


def ddp_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward/backward of a DDP-wrapped GPT with megatron's gradient finalization (the
    reductions of a training step); returns the loss."""
    from megatron.core.distributed import finalize_model_grads

    loss = lm_loss(model, batch)
    loss.backward()
    finalize_model_grads([model])
    return loss


def assert_grads_close(
    grads: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    describe: Callable[[str], str],
) -> None:
    """Each gradient against its expected value, at the tolerances of the layout tests;
    ``describe(name)`` starts the failure message."""
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{describe(n)}: {m}"
        )


def main_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # DDP accumulates into main_grad; finalize_model_grads reduces there.
    return {name: p.main_grad.detach().clone() for name, p in model.module.named_parameters()}


def snapshot(state: dict) -> dict:
    # Values may also be `_extra_state` placeholders (None), which need no copy.
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def tp_shard(full: Any, param: torch.Tensor | None, tp_rank: int, tp: int) -> Any:
    """This rank's shard of a full (TP=1) tensor for ``param``.

    Column/row-parallel and vocab-parallel weights split contiguous blocks along
    partition_dim; megatron's fused QKV rows are already grouped per head group, so a plain
    chunk is right. Replicated parameters (norms, hyper-connections) are returned whole."""
    if param is None or not getattr(param, "tensor_model_parallel", False):
        return full
    assert getattr(param, "partition_stride", 1) == 1, "strided partitions are not handled"
    return full.chunk(tp, dim=param.partition_dim)[tp_rank]


LAYER_KEY = r"^(decoder\.layers\.)(\d+)\."
EXPERT_KEY = r"(\.local_experts\.)(\d+)\."


def renumbered(full: dict, keys: Iterable[str], pattern: str, offset: int) -> dict:
    """Pick ``keys`` of a rank-local model from a full-model dict: ranks number modules
    (layers, experts) from 0, the full model from ``offset``."""

    def full_key(key: str) -> str:
        return re.sub(pattern, lambda m: f"{m[1]}{int(m[2]) + offset}.", key)

    return {key: full[full_key(key)] for key in keys}
