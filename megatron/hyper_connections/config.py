"""``TransformerConfig`` with the Hyper-Connection options: a drop-in subclass of megatron-core's.

With ``use_hyper_connections=False`` (the default) every model built from it is megatron-core's
own, parameter for parameter and bit for bit.
"""

import importlib.metadata
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.transformer.transformer_config import TransformerConfig as MCoreTransformerConfig

from . import permutations
from .options import (
    FINITE_FLOAT,
    HC,
    MHC,
    MHC_LITE,
    OPTIONAL_POSITIVE_INT,
    POSITIVE_INT,
    PROBABILITY,
    USE_MHC,
    check_options,
    hc_option,
)

__all__ = ["TransformerConfig"]


def _refuse_shadowed_fields(cls: type) -> type:
    """Refuse, at import, a field of ours that the installed megatron-core's config already
    has: a subclass field would shadow it silently (megatron-core 0.20's own mHC defines
    ``num_residual_streams``, for one)."""
    own = set(inspect.get_annotations(cls))
    for base in cls.__mro__[1:]:
        shadowed = sorted(own & set(getattr(base, "__dataclass_fields__", ())))
        if shadowed:
            version = _megatron_core_version()
            raise ImportError(
                f"megatron-core {version}'s {base.__module__}.{base.__qualname__} already "
                f"defines {', '.join(shadowed)}, which {cls.__module__}.{cls.__qualname__} "
                f"defines too: this package supports megatron-core >=0.15,<0.20, whose config "
                f"has none of its hyper-connection fields; install such a megatron-core"
            )
    return cls


def _megatron_core_version() -> str:
    """The installed distribution's version; megatron-core's own ``__version__`` gains the
    commit of whatever git repository its files lie in (a virtual environment inside a
    checkout, say)."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # a Megatron-LM checkout on PYTHONPATH
        from megatron.core.package_info import __shortversion__

        return __shortversion__


@_refuse_shadowed_fields
@dataclass
class TransformerConfig(MCoreTransformerConfig):
    """megatron-core's ``TransformerConfig`` plus Hyper-Connections (HC), mHC and
    Frac-Connections. All options are validated in ``__post_init__``."""

    use_hyper_connections: bool = hc_option(False, needs=None)
    """Replace every residual connection by a hyper-connection (HC, or mHC below)."""

    num_residual_streams: int = hc_option(
        1, module_arg="num_residual_streams", must_match=True, allowed=POSITIVE_INT
    )
    """n, the number of residual streams (expansion rate); the paper's best is 4."""

    hyper_connections_dropout: float = hc_option(0.0, module_arg="dropout", allowed=PROBABILITY)
    """Dropout on each stream's share of a branch output, with an independent mask per stream
    (``hidden_dropout`` still applies to the branch output itself first)."""

    num_fracs: int = hc_option(
        1, kinds=(HC,), module_arg="num_fracs", must_match=True, allowed=POSITIVE_INT
    )
    """m > 1: Frac-Connections, the hidden state split into m fractions (needs n = 1)."""

    use_manifold_hyper_connections: bool = hc_option(False)
    """mHC: sigmoid-constrained H_pre / H_post and a doubly stochastic H_res (needs n >= 2)."""

    hyper_connections_dynamic: bool = hc_option(
        True, flag="--hyper-connections-static", module_arg="dynamic"
    )
    """Dynamic coefficients computed from each token (DHC, mHC) or static ones only (SHC)."""

    hyper_connections_tanh: bool = hc_option(
        True,
        flag="--hyper-connections-no-tanh",
        kinds=(HC,),
        module_arg="use_tanh",
        must_match=True,
    )
    """HC only: tanh on the dynamic coefficients (False: the paper's "without tanh" ablation)."""

    hyper_connections_scale_output_init: bool = hc_option(False)
    """Divide the init std of the attention and MLP output projections by sqrt(n), the HC
    paper's scaling, so that n streams receiving each branch output start at the baseline's
    scale. Changes the initial weights, so it is off by default."""

    recompute_hyper_connections: bool = hc_option(False)
    """Keep the n-stream state for backward only at the first sublayer of every block of
    ``hyper_connections_recompute_block_size`` sublayers and rebuild the others from it in
    backward (the mHC paper's recomputation: cheap HC ops only, never attention or MLP)."""

    hyper_connections_recompute_block_size: int | None = hc_option(
        None, needs="recompute_hyper_connections", allowed=OPTIONAL_POSITIVE_INT
    )
    """Sublayers (attention and MLP count one each) per kept state; None: 2n, one kept state
    (n units of [s, b, C]) per n layers, so that the state adds at most one unit per layer to
    the two branch outputs every layer keeps. Backward rebuilds one block at a time, holding up
    to block-size states (2n^2 units) while it runs. The mHC paper's optimum of kept plus
    rebuilt states, round(sqrt(n * L / (n + 2))) for L sublayers, is within a few percent of
    the same total for deep stages."""

    hyper_connections_compile: bool = hc_option(False)
    """Run the coefficient computation (RMS factor, gates, tanh / sigmoid, Sinkhorn and their
    backward) through ``torch.compile``: a few fused kernels instead of some 20 small per-token
    ops (about 100 per pass of mHC's Sinkhorn). Costs a compilation of 20-30 s on the first
    steps; on a CPU the eager ops are as fast, so it is off by default."""

    hyper_connections_fused_kernels: bool = hc_option(False)
    """Triton kernels for every pass over the state (the RMS projection, the width connection
    H_pre X, the depth connection H_res X + H_post^T y merged with the bias-dropout-add) and
    for the coefficients of mHC and mHC-lite, on CUDA tensors, with the memory of the lean
    backend. Needs Triton. ``backends.config_backend`` says what a configuration runs:
    per-stream dropout runs on plain autograd, log-domain Sinkhorn keeps its coefficients in
    PyTorch, and tensors the kernels cannot take (CPU, fp64) run on PyTorch ops; each such
    fallback is logged once."""

    mhc_sinkhorn_iters: int = hc_option(
        20, needs=USE_MHC, kinds=(MHC,), module_arg="sinkhorn_iters", allowed=POSITIVE_INT
    )
    """mHC: Sinkhorn-Knopp iterations producing H_res."""

    mhc_log_domain_sinkhorn: bool = hc_option(
        False, needs=USE_MHC, kinds=(MHC,), module_arg="log_domain_sinkhorn"
    )
    """mHC: log-domain Sinkhorn, stable for large logits at some extra cost."""

    mhc_num_dynamic_alpha_proposals: int = hc_option(
        1,
        needs=USE_MHC,
        kinds=(MHC, MHC_LITE),
        module_arg="num_proposals",
        must_match=True,
        allowed=POSITIVE_INT,
    )
    """mHC: P independent coefficient projections, each constrained, then averaged."""

    mhc_h_res_bias_init: float = hc_option(
        4.0,
        needs=USE_MHC,
        kinds=(MHC, MHC_LITE),
        module_arg="h_res_bias_init",
        allowed=FINITE_FLOAT,
    )
    """mHC: c in the H_res bias init c * I. 0 starts H_res at 1/n (streams averaged at every
    sublayer); larger c leans it towards the identity (diagonal e^c / (e^c + n - 1))."""

    mhc_h_res_parameterization: Literal["sinkhorn", "permutations"] = hc_option(
        "sinkhorn",
        needs=USE_MHC,
        kinds=(MHC, MHC_LITE),
        module_arg="h_res_parameterization",
        must_match=True,
    )
    """mHC: how H_res is made doubly stochastic: "sinkhorn" (the mHC paper: Sinkhorn-Knopp on
    n x n logits) or "permutations" (mHC-lite: a softmax mixture of the n! permutation
    matrices, exactly doubly stochastic with no iterations; n <= 6). With "permutations" the
    H_res bias init puts c = ``mhc_h_res_bias_init`` on the identity permutation."""

    def __post_init__(self) -> None:
        # Our options first, so a wrong one is reported before megatron-core's own checks.
        self._validate_hyper_connections()
        super().__post_init__()
        if self.use_hyper_connections and self.pipeline_model_parallel_size > 1:
            # Stage boundaries carry [s, b, n*C] while megatron-core's schedules size their
            # receive buffers from hidden_size; with this flag its p2p communication sends
            # each tensor's shape first, for the plain and the interleaved schedule alike.
            self.variable_seq_lengths = True
            vp = self.virtual_pipeline_model_parallel_size
            if vp is not None and self.batch_p2p_comm:
                # With batched p2p, megatron-core 0.16's interleaved schedule then hangs
                # (PP = 4; NVIDIA/Megatron-LM#5100) and, at PP = 2, where the previous and next
                # stage are one rank, swaps forward and backward messages (any model; #1450).
                raise ValueError(
                    f"virtual_pipeline_model_parallel_size={vp} with "
                    f"pipeline_model_parallel_size={self.pipeline_model_parallel_size} and "
                    f"use_hyper_connections=True needs batch_p2p_comm=False, got "
                    f"batch_p2p_comm=True: set overlap_p2p_comm=True, batch_p2p_comm=False "
                    f"(Megatron-LM's setting for the interleaved schedule)"
                )
        if self.use_hyper_connections and self.hyper_connections_scale_output_init:
            self.output_layer_init_method = _scaled(
                self.output_layer_init_method, 1.0 / math.sqrt(self.num_residual_streams)
            )

    def _validate_hyper_connections(self) -> None:
        # Ranges and "no effect without" refusals come from the declarations (see ``options``);
        # what follows are the checks that involve several options or megatron-core's own.
        check_options(self)
        if self.recompute_hyper_connections:
            if self.recompute_granularity == "full":
                raise ValueError(
                    "recompute_hyper_connections=True with recompute_granularity='full' is not "
                    "supported: full recompute already rebuilds every state; use one of them"
                )
            if self.hyper_connections_dropout > 0:
                raise ValueError(
                    f"recompute_hyper_connections=True needs hyper_connections_dropout=0, got "
                    f"hyper_connections_dropout={self.hyper_connections_dropout}: rebuilding a "
                    f"state would need its dropout masks"
                )

        if self.hyper_connections_fused_kernels:
            from .kernels import availability

            if not availability.HAVE_TRITON:
                raise ValueError(
                    "hyper_connections_fused_kernels=True needs Triton, which is not "
                    "installed: pip install triton (it comes with CUDA builds of torch), or "
                    "use hyper_connections_fused_kernels=False"
                )

        if self.num_fracs > 1:
            if self.num_residual_streams > 1:
                raise ValueError(
                    f"num_fracs={self.num_fracs} with num_residual_streams="
                    f"{self.num_residual_streams} is not supported: Frac-Connections split "
                    f"one stream into fractions, so use num_residual_streams=1 with num_fracs > 1"
                )
            if self.hidden_size % self.num_fracs:
                raise ValueError(
                    f"num_fracs={self.num_fracs} must divide hidden_size={self.hidden_size}"
                )
        lite = self.mhc_h_res_parameterization == "permutations"
        if lite and self.num_residual_streams > permutations.MAX_STREAMS:
            raise ValueError(
                f"mhc_h_res_parameterization='permutations' takes num_residual_streams <= "
                f"{permutations.MAX_STREAMS} (n! H_res logits per token), got "
                f"num_residual_streams={self.num_residual_streams}: use fewer streams or "
                f"mhc_h_res_parameterization='sinkhorn'"
            )
        if self.use_manifold_hyper_connections and self.num_residual_streams < 2:
            raise ValueError(
                f"use_manifold_hyper_connections=True needs num_residual_streams >= 2, got "
                f"num_residual_streams={self.num_residual_streams}"
            )
        cuda_graphs = getattr(self, "cuda_graph_impl", "none") != "none" or getattr(
            self, "enable_cuda_graph", False
        )
        if self.use_hyper_connections and cuda_graphs:
            raise ValueError(
                f"cuda_graph_impl={getattr(self, 'cuda_graph_impl', None)!r} is not "
                f"supported with use_hyper_connections=True: use cuda_graph_impl='none'"
            )


def _scaled(init_method: Callable[[torch.Tensor], object], factor: float) -> Callable:
    def init(weight: torch.Tensor) -> None:
        init_method(weight)
        with torch.no_grad():
            weight.mul_(factor)

    return init
