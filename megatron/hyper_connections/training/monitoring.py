"""What a pretraining run reports: the usual training scalars and the stability of HC / mHC.

Stability (the mHC paper's "Amax", see ``megatron.hyper_connections.metrics``): every
hyper-connection module keeps a detached reference to the H_res [..., n, n] of its last forward
pass; nothing is read from the device until a log interval asks for it. Then, for every
sublayer l = 0 .. 2L-1 of the whole network (attention of layer k is 2k, its MLP 2k + 1; the
pipeline stages send their small per-sublayer summaries to the logging rank), over the tokens
of the last micro-batch:

- forward gain (max absolute row sum) and backward gain (max absolute column sum) of H_res:
  ``h_res_mean_matrix`` is the gain of the token-averaged matrix, ``h_res_per_token`` the mean
  over tokens of each token's gain;
- the same gains of the composite P_l = H_res[2L-1] ... H_res[l], how the state entering
  sublayer l is mixed by the end of the network: ``composite_mean_matrix`` is the product of
  the token-averaged matrices, ``composite_per_token`` the mean over a fixed subsample of
  ``SUBSAMPLE_TOKENS`` tokens of each token's product (a subsample keeps what the stages send
  small);
- with ``--log-mhc-amax``, ``log_amax``: the log of the largest singular value of the
  token-averaged H_res (about 0 for mHC by construction).

Tags (built by ``stability_tag`` and nowhere else):
``hyper-connections/forward_gain/composite_per_token/layer_03_mlp`` and the like, plus
``.../max``, the largest over sublayers. The training scalars use Megatron-LM's tag names
(``lm loss``, ``lm loss validation``, ``lm loss validation ppl``, ``learning-rate``,
``grad-norm``, ``batch-size``, ``iteration-time``, ``loss-scale``) and ``tokens-per-second``.
Megatron-LM's ``throughput`` is model TFLOP/s per GPU from a FLOP count of the plain transformer;
it is not logged, since the HC / mHC FLOP count is not that formula.

Each log interval prints one line on the console (with the largest composite gains), each
validation another, and the end of training a short stability summary. Scalars go to
TensorBoard (``--tensorboard-dir``), to Weights & Biases (``--wandb-project``) and to a JSON
Lines file, ``scalars.jsonl`` in the TensorBoard directory (else in ``--save``): one object per
logging event, ``{"iteration": i, tag: value, ...}``. A resumed run drops what the interrupted
run logged after its checkpoint, from the JSONL file and (with TensorBoard's ``purge_step``)
from the event files. A run killed mid-write (or a full disk) can leave the file's last line
incomplete: ``read_scalar_records`` reports it, and a new run drops it before appending.

Non-finite values (a run with ``--no-check-for-nan-in-loss-and-grad``, or the last log before
the check stops a run) are logged as they are: ``nan`` on the console, NaN in the JSONL file;
the stability metrics of a non-finite H_res are NaN, never an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..hyper_connection import HyperConnectionBase
from ..metrics import composite, gains, log_amax
from .parser import args_as_dict

__all__ = [
    "H_RES",
    "JSONL_FILE",
    "LOG_AMAX",
    "MAX_OVER_SUBLAYERS",
    "SUBSAMPLE_TOKENS",
    "ScalarWriter",
    "StabilitySummary",
    "TrainingMonitor",
    "gain_quantity",
    "h_res_summary",
    "hyper_connection_stability",
    "is_logging_rank",
    "per_sublayer",
    "read_scalar_records",
    "stability_scalars",
    "stability_tag",
    "sublayer_name",
]

SUBSAMPLE_TOKENS = 64
"""Tokens per sublayer whose H_res the stages send for the per-token composites."""

JSONL_FILE = "scalars.jsonl"

_TAG_ROOT = "hyper-connections"
H_RES = "h_res"
"""The quantity of the token-averaged H_res matrices (nested lists, JSONL only)."""
LOG_AMAX = "log_amax"
MAX_OVER_SUBLAYERS = "max"
"""What stands for the sublayer in the tag of a quantity's largest value over sublayers."""

# The gains the stability summary follows: label -> (direction, matrix) of ``gain_quantity``.
_WATCHED_GAINS = {
    "composite forward gain": ("forward", "composite"),
    "composite backward gain": ("backward", "composite"),
    "H_res forward gain": ("forward", "h_res"),
    "H_res backward gain": ("backward", "h_res"),
}

_GAIN_KEYS = (
    "forward_mean_matrix",
    "backward_mean_matrix",
    "forward_per_token",
    "backward_per_token",
)


def sublayer_name(index: int) -> str:
    """``layer_03_mlp`` for sublayer 7: attention of (0-based) layer k is 2k, its MLP 2k + 1."""
    return f"layer_{index // 2:02d}_{'attn' if index % 2 == 0 else 'mlp'}"


def gain_quantity(direction: str, matrix: str, statistic: str) -> str:
    """``forward_gain/composite_per_token``: the ``direction`` ("forward", max absolute row sum,
    or "backward", max absolute column sum) gain of ``matrix`` ("h_res" or "composite", the
    product P_l) by ``statistic`` ("mean_matrix": of the token-averaged matrix, "per_token":
    the mean of the tokens' gains)."""
    return f"{direction}_gain/{matrix}_{statistic}"


def stability_tag(quantity: str, sublayer: int | str = MAX_OVER_SUBLAYERS) -> str:
    """The tag of ``quantity`` (a ``gain_quantity``, ``LOG_AMAX`` or ``H_RES``) at ``sublayer``,
    an index (named by ``sublayer_name``) or a name: by default the largest over sublayers.
    ``stability_tag(gain_quantity("forward", "composite", "per_token"), 7)`` is
    ``hyper-connections/forward_gain/composite_per_token/layer_03_mlp``."""
    name = sublayer_name(sublayer) if isinstance(sublayer, int) else sublayer
    return f"{_TAG_ROOT}/{quantity}/{name}"


_Value = TypeVar("_Value")


def per_sublayer(record: Mapping[str, _Value], quantity: str) -> dict[int, _Value]:
    """The values of ``quantity`` in ``record`` (tag -> value) by sublayer index."""
    # Each sublayer has a tag of its own, so every index found is below len(record).
    tags = ((index, stability_tag(quantity, index)) for index in range(len(record)))
    return {index: record[tag] for index, tag in tags if tag in record}


def is_logging_rank() -> bool:
    """The rank that logs: the last pipeline stage (it has the loss) of the first
    tensor-, context- and data-parallel rank."""
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )


# --------------------------------------------------------------------------------------------
# Stability of the residual mixing


def hyper_connection_stability(
    model_chunks: Sequence[torch.nn.Module],
    with_log_amax: bool = False,
    matrices: dict[str, list[list[float]]] | None = None,
) -> dict[str, float]:
    """The stability scalars of every sublayer of the network (see the module docstring) on the
    logging rank, ``{}`` elsewhere and without hyper-connections.

    Collective over the pipeline group of the logging rank (the other ranks return at once);
    reads only the H_res the modules kept from their last forward pass."""
    from megatron.core import parallel_state as ps

    if not (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    ):
        return {}
    local = _stage_summaries(model_chunks)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        stages = [local]
    else:
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        stages = [None] * ps.get_pipeline_model_parallel_world_size() if last else None
        dist.gather_object(
            local,
            stages,
            dst=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        if not last:
            return {}
    summaries = {index: summary for stage in stages for index, summary in stage.items()}
    if matrices is not None:
        matrices.update(h_res_matrices(summaries))
    return stability_scalars(summaries, with_log_amax) if summaries else {}


def _stage_summaries(model_chunks: Sequence[torch.nn.Module]) -> dict[int, dict[str, Tensor]]:
    """The ``h_res_summary`` of every sublayer of this stage, from its last H_res (on the CPU:
    this is where the device is synchronised)."""
    summaries = {
        module.layer_index: h_res_summary(module.last_h_res())
        for module in (m for chunk in model_chunks for m in chunk.modules())
        if isinstance(module, HyperConnectionBase) and module.last_h_res() is not None
    }
    return {i: {k: v.cpu() for k, v in s.items()} for i, s in summaries.items()}


def h_res_summary(h_res: Tensor) -> dict[str, Tensor]:
    """What a sublayer's H_res [..., n, n] contributes to the stability scalars: the
    token-averaged matrix ``mean`` [n, n], the ``gains`` (``_GAIN_KEYS`` and log_amax) and a
    fixed token ``sample`` [K, n, n]."""
    tokens = h_res.reshape(-1, *h_res.shape[-2:]).float()  # static HC: one "token"
    # Evenly spaced, so every stage picks the same tokens of the same micro-batch.
    count = min(SUBSAMPLE_TOKENS, len(tokens))
    picks = torch.linspace(0, len(tokens) - 1, count, device=tokens.device).round().long()
    mean = tokens.mean(dim=0)
    token_gains = gains(tokens)
    # The SVD behind log_amax fails on a non-finite matrix: NaN for it (without a host sync).
    finite = torch.isfinite(mean).all()
    amax = log_amax(torch.where(finite, mean, torch.eye(len(mean), device=mean.device)))
    amax = torch.where(finite, amax, torch.full_like(amax, math.nan))
    return {
        "mean": mean,
        "gains": torch.stack([*(token_gains[k] for k in _GAIN_KEYS), amax]),
        "sample": tokens[picks],
    }


def h_res_matrices(summaries: dict[int, dict[str, Tensor]]) -> dict[str, list[list[float]]]:
    """The token-averaged H_res [n, n] of every sublayer as nested lists, tagged
    ``hyper-connections/h_res/layer_03_mlp`` and the like (JSONL only: not scalars)."""
    return {
        stability_tag(H_RES, index): summaries[index]["mean"].tolist()
        for index in sorted(summaries)
    }


def stability_scalars(
    summaries: dict[int, dict[str, Tensor]], with_log_amax: bool = False
) -> dict[str, float]:
    """Tagged scalars from the per-sublayer ``h_res_summary``s (index -> summary). Composites need
    every sublayer 0 .. 2L-1 and are left out otherwise."""
    per_quantity: dict[str, dict[int, float]] = {}

    def put(quantity: str, index: int, value: float) -> None:
        per_quantity.setdefault(quantity, {})[index] = value

    indices = sorted(summaries)
    for index in indices:
        fwd_mean, bwd_mean, fwd_token, bwd_token, amax = summaries[index]["gains"].tolist()
        put(gain_quantity("forward", "h_res", "mean_matrix"), index, fwd_mean)
        put(gain_quantity("backward", "h_res", "mean_matrix"), index, bwd_mean)
        put(gain_quantity("forward", "h_res", "per_token"), index, fwd_token)
        put(gain_quantity("backward", "h_res", "per_token"), index, bwd_token)
        if with_log_amax:
            put(LOG_AMAX, index, amax)
    samples = [summaries[i]["sample"] for i in indices]
    if indices == list(range(len(indices))) and len({s.shape for s in samples}) == 1:
        mean_products = composite([summaries[i]["mean"] for i in indices])
        token_products = composite(samples)
        for index, mean_product, token_product in zip(
            indices, mean_products, token_products, strict=True
        ):
            of_mean, of_tokens = gains(mean_product), gains(token_product)
            for direction in ("forward", "backward"):
                put(
                    gain_quantity(direction, "composite", "mean_matrix"),
                    index,
                    float(of_mean[f"{direction}_mean_matrix"]),
                )
                put(
                    gain_quantity(direction, "composite", "per_token"),
                    index,
                    float(of_tokens[f"{direction}_per_token"]),
                )

    scalars = {}
    for quantity, values in per_quantity.items():
        scalars.update({stability_tag(quantity, index): value for index, value in values.items()})
        scalars[stability_tag(quantity)] = max(values.values())
    return scalars


# --------------------------------------------------------------------------------------------
# Where scalars go


class ScalarWriter:
    """TensorBoard, Weights & Biases and the JSONL file (see the module docstring); only the
    outputs that ``args`` ask for. ``start_iteration`` > 0: a resumed run, whose earlier logs
    past that iteration are dropped."""

    def __init__(self, args: argparse.Namespace, start_iteration: int) -> None:
        self.tensorboard = None
        if args.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(
                args.tensorboard_dir,
                purge_step=start_iteration + 1 if start_iteration else None,
                flush_secs=10,
            )
        self.jsonl = None
        log_dir = args.tensorboard_dir or args.save
        if log_dir is not None:
            path = Path(log_dir) / JSONL_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            _drop_records_after(path, start_iteration)
            self.jsonl = path.open("a", encoding="utf-8")
        self.wandb = None
        if args.wandb_project is not None:
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project,
                name=args.wandb_exp_name,
                dir=log_dir,
                config=args_as_dict(args),
            )

    def write(
        self,
        iteration: int,
        scalars: dict[str, float],
        matrices: dict[str, list[list[float]]] | None = None,
    ) -> None:
        """``matrices`` (tag -> nested list) go to the JSONL file only."""
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, iteration)
            self.tensorboard.flush()  # what a crash would lose otherwise, till the next flush
        if self.jsonl is not None:
            record = {"iteration": iteration, **scalars, **(matrices or {})}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_scalar_records(path: str | os.PathLike) -> tuple[list[dict], str | None]:
    """The records of a JSONL log, in file order, and its incomplete last line (None if there
    is none): a last line that is not a whole JSON record, as a write cut short leaves it.
    ``ValueError`` naming the file and the line for a broken line before the last."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    last = max((index for index, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict] = []
    for index, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            record, reason = None, str(error)
        else:
            reason = "no iteration number in it"
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            if index == last:
                return records, line
            raise ValueError(f"{path} line {index + 1} is not a JSON record: {reason}")
        records.append(record)
    return records, None


def _drop_records_after(path: Path, iteration: int) -> None:
    """Keep the JSONL records of iterations <= ``iteration`` (all of them when it is 0), and
    drop an incomplete last line, which the next record would otherwise be appended to."""
    if not path.is_file():
        return
    records, incomplete = read_scalar_records(path)
    if incomplete is not None:
        print(
            f"warning: {path}: dropped its incomplete last line (a run stopped while writing "
            f"it?): {incomplete[:60]!r}",
            flush=True,
        )
    elif not iteration and path.read_bytes().endswith(b"\n"):
        return
    # json.dumps writes each record back as it was written.
    kept = [record for record in records if not iteration or record["iteration"] <= iteration]
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    os.replace(staging, path)


# --------------------------------------------------------------------------------------------
# The stability summary and the console


class StabilitySummary:
    """The run so far in a few lines: loss, validation loss, non-finite losses, skipped updates
    and, with hyper-connections, the largest gains seen (when and where)."""

    def __init__(self) -> None:
        self.first_loss: tuple[int, float] | None = None
        self.last_loss: tuple[int, float] | None = None
        self.best_validation: tuple[int, float] | None = None
        self.non_finite = 0
        self.skipped_updates = 0
        # label -> (value, iteration, tag) of the largest value seen, per token-statistic kind
        self.largest: dict[tuple[str, str], tuple[float, int, str]] = {}
        self.latest: dict[tuple[str, str], float] = {}

    def update(self, iteration: int, scalars: dict[str, float]) -> None:
        loss = scalars.get("lm loss")
        if loss is not None:
            self.first_loss = self.first_loss or (iteration, loss)
            self.last_loss = (iteration, loss)
            self.non_finite += not math.isfinite(loss)
        validation = scalars.get("lm loss validation")
        if validation is not None and (
            self.best_validation is None or validation < self.best_validation[1]
        ):
            self.best_validation = (iteration, validation)
        for label, (direction, matrix) in _WATCHED_GAINS.items():
            for statistic in ("mean_matrix", "per_token"):
                values = per_sublayer(scalars, gain_quantity(direction, matrix, statistic))
                if not values:
                    continue
                index = max(values, key=values.get)
                key = (label, statistic)
                self.latest[key] = values[index]
                if key not in self.largest or values[index] > self.largest[key][0]:
                    self.largest[key] = (values[index], iteration, sublayer_name(index))

    def lines(self) -> list[str]:
        lines = []
        if self.last_loss is not None:
            text = (
                f"lm loss {self.first_loss[1]:.4f} (iteration {self.first_loss[0]}) -> "
                f"{self.last_loss[1]:.4f} (iteration {self.last_loss[0]})"
            )
            if self.best_validation is not None:
                text += (
                    f"; best validation {self.best_validation[1]:.4f} "
                    f"(iteration {self.best_validation[0]})"
                )
            lines.append(
                f"{text}; non-finite losses logged: {self.non_finite}; "
                f"skipped updates: {self.skipped_updates}"
            )
        if self.largest:
            lines.append("max over sublayers (mean matrix / per token):")
        for label in _WATCHED_GAINS:
            keys = [(label, "mean_matrix"), (label, "per_token")]
            if not all(key in self.largest for key in keys):
                continue
            now = " / ".join(f"{self.latest[key]:.4f}" for key in keys)
            largest = " / ".join(
                "{:.4f} (iteration {}, {})".format(*self.largest[key]) for key in keys
            )
            lines.append(f"{label}: now {now}; largest {largest}")
        return lines


class TrainingMonitor:
    """Everything a training run logs, on the logging rank; the other ranks take part in the
    collectives only. Call ``record_step`` after every step, ``log_training`` every log
    interval (collective), ``log_validation`` after each evaluation, ``print_summary`` at the
    end of training and ``close``."""

    def __init__(self, args: argparse.Namespace, start_iteration: int) -> None:
        self.args = args
        self.logging = is_logging_rank()
        self.writer = ScalarWriter(args, start_iteration) if self.logging else None
        self.summary = StabilitySummary()
        self.seconds = 0.0  # training time since the last log
        self.steps = 0
        self.grad_norm: float | None = None

    def print(self, text: str) -> None:
        if self.logging:
            print(text, flush=True)

    def record_step(self, grad_norm: float | None, updated: bool, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1
        self.grad_norm = grad_norm
        self.summary.skipped_updates += not updated

    def log_training(
        self,
        iteration: int,
        loss: float | None,
        learning_rate: float,
        model_chunks: Sequence[torch.nn.Module],
        loss_scale: float | None = None,
    ) -> None:
        """Log the steps since the last call; ``loss``: their mean loss (logging rank)."""
        args = self.args
        matrices: dict[str, list[list[float]]] = {}
        stability = hyper_connection_stability(model_chunks, args.log_mhc_amax, matrices)
        seconds_per_step = self.seconds / max(self.steps, 1)
        self.seconds, self.steps = 0.0, 0
        if not self.logging:
            return
        tokens_per_second = args.global_batch_size * args.seq_length / seconds_per_step
        scalars = {
            "lm loss": loss,
            "learning-rate": learning_rate,
            "grad-norm": self.grad_norm,
            "loss-scale": loss_scale,
            "batch-size": args.global_batch_size,
            "iteration-time": seconds_per_step,
            "tokens-per-second": tokens_per_second,
            **stability,
        }
        scalars = {tag: float(value) for tag, value in scalars.items() if value is not None}
        self.writer.write(iteration, scalars, matrices)
        self.summary.update(iteration, scalars)

        eta = datetime.timedelta(seconds=round(seconds_per_step * (args.train_iters - iteration)))
        width = len(str(args.train_iters))
        line = (
            f"iteration {iteration:{width}d}/{args.train_iters} | lm loss {loss:.4f} | "
            f"lr {learning_rate:.3e} | "
        )
        if self.grad_norm is not None:
            line += f"grad norm {self.grad_norm:.3f} | "
        line += (
            f"{tokens_per_second:,.0f} tokens/s | {1000 * seconds_per_step:.1f} ms/it | ETA {eta}"
        )
        largest = [
            scalars.get(stability_tag(gain_quantity(direction, "composite", statistic)))
            for direction in ("forward", "backward")
            for statistic in ("mean_matrix", "per_token")
        ]
        if None not in largest:
            line += (
                " | composite gain fwd {:.3f}/{:.3f} bwd {:.3f}/{:.3f} (max; mean matrix/per "
                "token)".format(*largest)
            )
        print(line, flush=True)

    def log_validation(self, iteration: int, loss: float | None) -> None:
        if not self.logging:
            return
        ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else math.nan
        scalars = {"lm loss validation": loss, "lm loss validation ppl": ppl}
        self.writer.write(iteration, scalars)
        self.summary.update(iteration, scalars)
        print(
            f"validation at iteration {iteration} | lm loss {loss:.4f} | "
            f"ppl {scalars['lm loss validation ppl']:.3f}",
            flush=True,
        )

    def print_summary(self) -> None:
        if self.logging:
            lines = ["stability summary:", *(f"  {line}" for line in self.summary.lines())]
            print("\n".join(lines), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
