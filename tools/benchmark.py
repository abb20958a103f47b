"""Cost of hyper-connections against the residual baseline, measured in one process.

For the residual baseline and DHC / mHC at several stream counts, on one megatron-core
transformer layer and on a small GPT built from megatron-core's own specs:

- forward+backward time per step, the median over ``--repeats`` steps, as a ratio to the
  baseline of the same scope (configurations take turns step by step, so drifts in machine
  speed hit all of them alike);
- bytes saved for backward, counted with autograd's saved-tensor hooks (distinct storages,
  parameters excluded) and given per layer in units of one [s, b, C] activation: the extra
  over the baseline, hardware independent;
- parameters and FLOPs per token (analytic: matmuls and the connections' multiply-adds), as
  overheads over the baseline;
- operations per sublayer: the aten ops one sublayer's hyper-connection dispatches in its
  forward and backward (width and depth connection, parameter gradients included, the branch
  left out), counted on the model's first hyper-connection module on its own: hardware
  independent, and on a GPU the kernel launches that small-size steps pay for;
- the backend the hyper-connections run on, and why (``backends.config_backend``).

Writes ``benchmark.json`` and ``benchmark.md`` (the table) into ``--output-dir``. Runs on CPU
(gloo, one process) and on a GPU (NCCL; the Transformer Engine spec when it is installed).

    python tools/benchmark.py                       # CPU default: hidden 1024, sequence 512
    python tools/benchmark.py --preset demo         # the size of tools/demo.py
    python tools/benchmark.py --threads 1 --clock cpu   # CPU time: on a machine shared with others
    python tools/benchmark.py --bf16 --hidden-size 2048 --num-layers 16 --seq-length 2048 \\
        --vocab-size 32768 --streams 4             # a ~1B-parameter GPT on one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.hyper_connections.manifold_hyper_connection import coefficient_width
from megatron.hyper_connections.permutations import MAX_STREAMS
from megatron.hyper_connections.saved_memory import saved_tensor_bytes

UNITS_NOTE = "units: one [s, b, C] activation of the model's dtype"
OPS_NOTE = (
    "aten ops that one sublayer's hyper-connection dispatches, forward + backward (width and "
    "depth connection with the branch input as branch output, the loss's backward and the "
    "gradient accumulation included), counted on one module on its own; Triton kernels are "
    "not aten ops"
)

PRESETS = {
    "default": {},
    # tools/demo.py's model: its ByteTokenizer's 257 ids padded to a multiple of 128.
    "demo": {
        "hidden_size": 128,
        "num_attention_heads": 4,
        "seq_length": 128,
        "micro_batch_size": 8,
        "num_layers": 4,
        "vocab_size": 384,
    },
}


@dataclass
class Variant:
    name: str
    hc: dict[str, Any] | None  # TransformerConfig options; None is the residual baseline
    streams: int = 1

    @property
    def manifold(self) -> bool:
        return bool(self.hc and self.hc.get("use_manifold_hyper_connections"))


@dataclass
class Case:
    """One variant built in one scope, ready to step."""

    variant: Variant
    forward: Callable[[], Tensor]
    """Runs the forward pass and returns the scalar to backpropagate."""
    model: nn.Module
    backend: tuple[str, str]
    """(backend and coefficients, why) of the hyper-connections; dashes for the baseline."""
    times: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="model size: default (hidden 1024, sequence 512) or demo (tools/demo.py's: hidden "
        "128, sequence 128, micro-batch 8, vocab 384); the size flags override it",
    )
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-attention-heads", type=int, default=16)
    parser.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4x hidden")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--num-layers", type=int, default=4, help="layers of the GPT scope")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--scopes", nargs="+", choices=["layer", "gpt"], default=["layer", "gpt"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    parser.add_argument(
        "--extras-streams",
        type=int,
        default=4,
        help="stream count of the extra rows (HC recompute, torch.compile, fused kernels)",
    )
    parser.add_argument(
        "--extras",
        nargs="*",
        choices=["recompute", "compile", "fused"],
        default=None,
        help="extra rows: HC recompute, torch.compile, Triton kernels (default: recompute and "
        "compile, plus fused on CUDA with Triton)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="step time as wall time, or as the CPU time of this process (CPU only; with "
        "--threads 1 it is what the step costs whatever else the machine runs)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmark"))
    preset, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[preset.preset])
    args = parser.parse_args(argv)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    for option in ("repeats", "hidden_size", "seq_length", "micro_batch_size", "num_layers"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.hidden_size % args.num_attention_heads:
        parser.error(
            f"--hidden-size {args.hidden_size} must be divisible by --num-attention-heads "
            f"{args.num_attention_heads}"
        )
    bad = [n for n in args.streams if n < 2]
    if bad:
        parser.error(f"--streams must be >= 2 (mHC needs two streams), got {bad}")
    from megatron.hyper_connections.kernels import availability

    fused_available = torch.cuda.is_available() and availability.HAVE_TRITON
    if args.extras is None:
        args.extras = ["recompute", "compile"] + ["fused"] * fused_available
    elif "fused" in args.extras and not fused_available:
        parser.error("--extras fused needs a CUDA device and Triton")
    if args.clock == "cpu" and torch.cuda.is_available():
        parser.error("--clock cpu times CPU work; on a GPU the step time is wall time")
    return args


def variants(args: argparse.Namespace, scope: str) -> list[Variant]:
    rows = [Variant("residual", None)]
    for n in args.streams:
        rows.append(Variant(f"DHC n={n}", {"num_residual_streams": n}, n))
    for n in args.streams:
        mhc = {"num_residual_streams": n, "use_manifold_hyper_connections": True}
        rows.append(Variant(f"mHC n={n}", mhc, n))
    for n in args.streams:
        if n <= MAX_STREAMS:  # n! logits per token
            lite = {
                "num_residual_streams": n,
                "use_manifold_hyper_connections": True,
                "mhc_h_res_parameterization": "permutations",
            }
            rows.append(Variant(f"mHC-lite n={n}", lite, n))
    n = args.extras_streams
    options_of = {
        "recompute": {"recompute_hyper_connections": True},
        "compile": {"hyper_connections_compile": True},
        "fused": {"hyper_connections_fused_kernels": True},
    }
    # The state chain of HC recompute spans a TransformerBlock: nothing to chain in one layer.
    labels = [label for label in args.extras if scope == "gpt" or label != "recompute"]
    extras = [(label, options_of[label]) for label in labels]
    for label, options in extras:
        rows.append(Variant(f"DHC n={n} +{label}", {"num_residual_streams": n, **options}, n))
        mhc = {"num_residual_streams": n, "use_manifold_hyper_connections": True, **options}
        rows.append(Variant(f"mHC n={n} +{label}", mhc, n))
    return rows


# Building the models


def setup_megatron() -> torch.device:
    from megatron.core import parallel_state

    from megatron.hyper_connections.training.distributed import initialize_distributed

    if not parallel_state.model_parallel_is_initialized():  # else: called from a test
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # a local rendezvous
        # The benchmark passes its own causal mask and runs no schedule or optimizer, so on
        # CPU it needs megatron-core's RNG tracker but not the CUDA-to-CPU function mode.
        initialize_distributed(function_mode=False)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_config(args: argparse.Namespace, variant: Variant, num_layers: int):
    from megatron.core.transformer.transformer_config import TransformerConfig as MCoreConfig

    from megatron.hyper_connections import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    options = dict(
        num_layers=num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=args.bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if variant.hc is None:
        return MCoreConfig(**options)
    return TransformerConfig(**options, use_hyper_connections=True, **variant.hc)


def backend_of(config) -> tuple[str, str]:
    """(backend and coefficients, why) of the config's hyper-connections, dashes without."""
    from megatron.hyper_connections.backends import config_backend

    if not getattr(config, "use_hyper_connections", False):
        return "-", "-"
    backend = config_backend(config)
    return f"{backend.name} ({backend.coefficients} coefficients)", backend.reason


def layer_spec():
    from megatron.core.models.gpt import gpt_layer_specs

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return gpt_layer_specs.get_gpt_layer_local_spec()
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


def build_layer(args: argparse.Namespace, variant: Variant, device: torch.device) -> Case:
    from megatron.core.transformer.spec_utils import build_module

    from megatron.hyper_connections import get_hyper_connection_spec

    config = model_config(args, variant, num_layers=1)
    spec = layer_spec() if variant.hc is None else get_hyper_connection_spec(layer_spec())
    torch.manual_seed(0)
    layer = build_module(spec, config=config, layer_number=1).to(device)
    s, b = args.seq_length, args.micro_batch_size
    state = torch.randn(s, b, variant.streams * args.hidden_size, device=device)
    state = state.to(config.params_dtype).requires_grad_()
    mask = causal_mask(s, device)

    def forward() -> Tensor:
        output = layer(hidden_states=state, attention_mask=mask)
        output = output[0] if isinstance(output, tuple) else output
        return output.float().sum()  # saves nothing itself, unlike a squared loss

    return Case(variant, forward, layer, backend_of(config))


def build_gpt(args: argparse.Namespace, variant: Variant, device: torch.device) -> Case:
    from megatron.core.models.gpt.gpt_model import GPTModel as MCoreGPTModel

    from megatron.hyper_connections import GPTModel

    config = model_config(args, variant, num_layers=args.num_layers)
    model_cls = MCoreGPTModel if variant.hc is None else GPTModel
    torch.manual_seed(0)
    model = model_cls(
        config,
        layer_spec(),
        vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
    ).to(device)
    s, b = args.seq_length, args.micro_batch_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (b, s + 1), generator=generator).to(device)
    positions = torch.arange(s, device=device).expand(b, s)
    mask = causal_mask(s, device)

    def forward() -> Tensor:
        per_token = model(tokens[:, :-1], positions, mask, labels=tokens[:, 1:])
        return per_token.float().mean()

    return Case(variant, forward, model, backend_of(config))


def causal_mask(seq_length: int, device: torch.device) -> Tensor | None:
    """None on a GPU, where megatron-core's attention (local or TE) builds its causal mask
    itself; on CPU an explicit one (True marks the masked, future positions), since the local
    attention's default mask is created with device="cuda"."""
    if device.type == "cuda":
        return None
    return torch.ones(seq_length, seq_length, device=device).triu(1).bool()[None, None]


# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: list[Case], args: argparse.Namespace, device: torch.device) -> None:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for repeat in range(args.warmup + args.repeats):
        for case in cases:
            case.model.zero_grad(set_to_none=True)
            synchronize(device)
            start = clock()
            case.forward().backward()
            synchronize(device)
            if repeat >= args.warmup:
                case.times.append(clock() - start)


def saved_bytes(case: Case) -> int:
    """Bytes the forward pass keeps for backward, parameters left out."""
    case.model.zero_grad(set_to_none=True)
    loss, saved = saved_tensor_bytes(case.forward, exclude=case.model.parameters())
    loss.backward()
    return saved


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_sublayer(
    case: Case, args: argparse.Namespace, device: torch.device
) -> tuple[int, int] | None:
    """(forward, backward) aten ops of one sublayer's hyper-connection, None without.

    Counted on the model's first hyper-connection module on its own, with the benchmark's
    [s, b, n*C] state and the branch input as the branch output: the width and depth
    connections forward, then the backward of a weighted sum of the new state (the loss's own
    backward and the gradient accumulation of the parameters and the state included). Without
    the state chain of HC recompute, which spans sublayers.
    """
    from megatron.hyper_connections import HyperConnectionBase

    module = next((m for m in case.model.modules() if isinstance(m, HyperConnectionBase)), None)
    if module is None:
        return None
    chain, position = module.state_chain, module.chain_position
    module.use_state_chain(None, 0)
    try:
        return _count_ops(module, args, device)
    finally:
        module.use_state_chain(chain, position)
        case.model.zero_grad(set_to_none=True)


def _count_ops(module, args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.seq_length, args.micro_batch_size, module.num_rows * module.row_size)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    state = torch.randn(shape, generator=generator, device=device).to(dtype).requires_grad_()
    weight = torch.randn(shape, generator=generator, device=device)

    def forward() -> Tensor:
        branch_input, depth_inputs = module.width_connection(state)
        return module.depth_connection(branch_input, depth_inputs)

    for _ in range(2):  # warm-up: anything built on the first call is not counted
        (forward().float() * weight).sum().backward()
    with OpCounter() as forward_ops:
        new_state = forward()
    loss = (new_state.float() * weight).sum()
    with OpCounter() as backward_ops:
        loss.backward()
    return forward_ops.count, backward_ops.count


def flops_per_token(args: argparse.Namespace, variant: Variant, scope: str) -> float:
    """Forward+backward FLOPs per token (backward = 2x forward), analytic."""
    c, f, s = args.hidden_size, args.ffn_hidden_size, args.seq_length
    layer = 2 * (4 * c * c + 2 * c * f + 2 * s * c)  # QKV+proj, MLP, scores+values
    per_sublayer = 0.0
    if variant.hc is not None:
        n = variant.streams
        per_sublayer = 2 * n * c + 2 * n * n * c + 2 * n * c  # H_pre X, H_res X + H_post^T y
        # The projection reads all n*C numbers of the state once (HC per row, mHC per token),
        # and runs once more in backward, where the coefficients are rebuilt from X.
        parameterization = variant.hc.get("mhc_h_res_parameterization", "sinkhorn")
        width = coefficient_width(n, parameterization) if variant.manifold else n + 2
        per_sublayer += (2 * n * c * width + 2 * n * c) * 4 / 3
        if variant.hc.get("recompute_hyper_connections"):
            per_sublayer += (2 * n * n * c + 2 * n * c) / 3  # the depth connection, once more
    layers = 1 if scope == "layer" else args.num_layers
    logits = 0 if scope == "layer" else 2 * c * args.vocab_size
    return 3 * (layers * (layer + 2 * per_sublayer) + logits)


def run_scope(scope: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    build = build_layer if scope == "layer" else build_gpt
    cases = [build(args, variant, device) for variant in variants(args, scope)]
    dtype_bytes = 2 if args.bf16 else 4
    unit = args.seq_length * args.micro_batch_size * args.hidden_size * dtype_bytes
    layers = 1 if scope == "layer" else args.num_layers
    saved = [saved_bytes(case) / unit / layers for case in cases]
    ops = [ops_per_sublayer(case, args, device) for case in cases]
    time_cases(cases, args, device)

    base = cases[0]
    base_time = statistics.median(base.times)
    base_params = sum(p.numel() for p in base.model.parameters())
    base_flops = flops_per_token(args, base.variant, scope)
    rows = []
    for case, units, counts in zip(cases, saved, ops, strict=True):
        params = sum(p.numel() for p in case.model.parameters())
        median = statistics.median(case.times)
        flops = flops_per_token(args, case.variant, scope)
        rows.append(
            {
                "scope": scope,
                "variant": case.variant.name,
                "options": case.variant.hc or {},
                "backend": case.backend[0],
                "backend_reason": case.backend[1],
                "step_ms": 1e3 * median,
                "step_ms_all": [1e3 * t for t in case.times],
                "time_ratio": median / base_time,
                "saved_units_per_layer": units,
                "extra_saved_units_per_layer": units - saved[0],
                "parameters": params,
                "parameter_overhead": params / base_params - 1,
                "flops_per_token": flops,
                "flop_overhead": flops / base_flops - 1,
                "ops_per_sublayer": None if counts is None else sum(counts),
                "ops_forward_backward": counts,
            }
        )
        print(
            f"{scope:5s} {case.variant.name:22s} {rows[-1]['time_ratio']:.3f}x "
            f"({1e3 * median:.1f} ms), extra saved {rows[-1]['extra_saved_units_per_layer']:.2f}, "
            f"ops/sublayer {rows[-1]['ops_per_sublayer'] or '-'}, "
            f"{case.backend[0]} backend: {case.backend[1]}",
            flush=True,
        )
    del cases
    return rows


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": cpu_model() or platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": [os.getloadavg()[0]],  # 1 minute, at the start (and the end, added)
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    return info


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    where = info.get("gpu") or f"{info['processor']}, {info['cpu_threads']} threads"
    lines = [
        f"Machine: {where}; torch {info['torch']}, megatron-core {info.get('megatron_core')}. "
        f"Model ({args.preset} preset): hidden {args.hidden_size}, FFN {args.ffn_hidden_size}, "
        f"heads {args.num_attention_heads}, sequence {args.seq_length}, micro-batch "
        f"{args.micro_batch_size}, {'bf16' if args.bf16 else 'fp32'}; GPT: "
        f"{args.num_layers} layers, vocab {args.vocab_size}. Median of {args.repeats} steps "
        f"({'CPU time of the process' if args.clock == 'cpu' else 'wall time'}); load average "
        f"{' then '.join(f'{load:.1f}' for load in info['load_average'])}.",
        "",
        "| scope | variant | backend | step time | vs residual | extra saved / layer "
        "| ops / sublayer | params | FLOPs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scope']} | {row['variant']} | {row['backend']} | {row['step_ms']:.1f} ms "
            f"| {row['time_ratio']:.3f}x | {row['extra_saved_units_per_layer']:.2f} "
            f"| {row['ops_per_sublayer'] or '-'} "
            f"| {100 * row['parameter_overhead']:+.2f}% | {100 * row['flop_overhead']:+.2f}% |"
        )
    lines += ["", f"Saved for backward: {UNITS_NOTE}, counted with saved-tensor hooks.", ""]
    lines += [f"Ops / sublayer: {OPS_NOTE}.", ""]
    lines += ["Why each backend (`backends.config_backend`):", ""]
    reasons = {row["variant"]: row["backend_reason"] for row in rows if row["backend"] != "-"}
    lines += [f"- {variant}: {reason}" for variant, reason in reasons.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_megatron()
    info = machine(device)
    rows = [row for scope in args.scopes for row in run_scope(scope, args, device)]
    info["load_average"] = [info["load_average"][0], os.getloadavg()[0]]
    result = {"machine": info, "arguments": vars(args) | {"output_dir": str(args.output_dir)}}
    result["results"] = rows
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(result, indent=1))
    table = markdown(rows, info, args)
    (args.output_dir / "benchmark.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
