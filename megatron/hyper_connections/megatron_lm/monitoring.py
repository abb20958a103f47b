"""The stability metrics of hyper-connections in Megatron-LM's TensorBoard and W&B.

The same scalars as the package's own trainer (``training.monitoring``: forward and backward
gains of every sublayer's H_res and of the composites over depth, ``--log-mhc-amax``'s
log_amax), at Megatron-LM's ``--log-interval``, under the tags ``hyper-connections/...``, in
the writers Megatron-LM made (``get_tensorboard_writer``, ``get_wandb_writer``), which live on
the last rank.

Megatron-LM's training loop has no hook between iterations, so the model reports: each forward
pass of a chunk in training mode is counted, and the last one of a logged iteration on a rank
(``num_microbatches`` per chunk) sends that stage's summaries (``h_res_summary``: small
tensors, no host sync) to the last rank, which writes the scalars. Between log intervals
nothing is read from the device. The stages of the last rank's pipeline take part, over a
process group of their own: a stage's last forward pass comes before the next stage's, so
the earlier stages send without waiting (an asynchronous gather) while the last rank, whose
last forward pass is the pipeline's last, receives; the pipeline schedule's own messages are
on other communicators and never wait for these.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.training import get_args, get_tensorboard_writer, get_wandb_writer
from torch import Tensor

from ..hyper_connection import HyperConnectionBase
from ..training.monitoring import SUBSAMPLE_TOKENS, h_res_summary, stability_scalars

__all__ = ["StabilityLogger", "stability_logger"]

_GAINS = 5  # forward / backward gains of the mean matrix and per token, and log_amax

_logger: StabilityLogger | None = None


def stability_logger(config: Any) -> StabilityLogger:
    """This process's ``StabilityLogger``, made (collectively) with its first model chunk."""
    global _logger
    if _logger is None:
        _logger = StabilityLogger(get_args(), config)
    return _logger


class StabilityLogger:
    """Collects the stages' summaries of a logged iteration on the last rank and writes them.
    Construct on every rank at once (it makes a process group)."""

    def __init__(self, args: argparse.Namespace, config: Any) -> None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        self.root = world_size - 1  # Megatron-LM's writers are on the last rank
        layout = None
        if rank == self.root:
            ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
            writes = get_tensorboard_writer() is not None or get_wandb_writer() is not None
            layout = (ranks, writes)
        shared = [layout]
        dist.broadcast_object_list(shared, src=self.root)
        ranks, writes = shared[0]
        # Every rank takes part in creating a group, members or not.
        self.group = dist.new_group(ranks) if writes and len(ranks) > 1 else None
        self.stages = len(ranks)
        self.member = writes and rank in ranks
        self.with_log_amax = bool(getattr(args, "log_mhc_amax", False))
        self.size = config.num_residual_streams * config.num_fracs  # H_res is [N, N]
        self.matrix = self.size * self.size
        self.rows = 2 * config.num_layers  # sublayers on any one stage, at most
        self.chunks: list[torch.nn.Module] = []
        self.iteration: int | None = None
        self.forwards = 0
        self.sent: tuple[Any, Tensor] | None = None  # an earlier stage's gather in flight

    def add_chunk(self, chunk: torch.nn.Module) -> None:
        self.chunks.append(chunk)

    def after_forward(self, chunk: torch.nn.Module) -> None:
        """Count a forward pass of ``chunk``; after this rank's last one of a logged
        iteration, send or write the summaries."""
        if not (self.member and chunk.training):
            return
        args = get_args()
        iteration = args.curr_iteration
        if iteration != self.iteration:
            self.iteration, self.forwards = iteration, 0
        self.forwards += 1
        last = self.forwards == get_num_microbatches() * len(self.chunks)
        if last and (iteration + 1) % args.log_interval == 0:
            self.report(iteration + 1)

    def report(self, iteration: int) -> None:
        packed = self._pack(
            {
                module.layer_index: h_res_summary(module.last_h_res())  # on the device
                for module in (m for chunk in self.chunks for m in chunk.modules())
                if isinstance(module, HyperConnectionBase) and module.last_h_res() is not None
            }
        )
        if self.group is None:
            stages = [packed]
        elif dist.get_rank() != self.root:
            if self.sent is not None:
                self.sent[0].wait()
            self.sent = (
                dist.gather(packed, None, dst=self.root, group=self.group, async_op=True),
                packed,
            )
            return
        else:
            stages = [torch.empty_like(packed) for _ in range(self.stages)]
            dist.gather(packed, stages, dst=self.root, group=self.group)
        scalars = stability_scalars(self._unpack(stages), self.with_log_amax)
        writer, wandb_writer = get_tensorboard_writer(), get_wandb_writer()
        if writer is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, iteration)
            writer.flush()
        if wandb_writer is not None:
            wandb_writer.log(scalars, iteration)

    def _pack(self, summaries: dict[int, dict[str, Tensor]]) -> Tensor:
        """One row per sublayer, padded to ``self.rows``: [index, token count, mean matrix,
        gains, token sample padded to SUBSAMPLE_TOKENS]; index -1 marks padding."""
        width = 2 + self.matrix + _GAINS + SUBSAMPLE_TOKENS * self.matrix
        device = next(self.chunks[0].parameters()).device
        packed = torch.zeros(self.rows, width, device=device)
        packed[:, 0] = -1
        for row, (index, summary) in enumerate(sorted(summaries.items())):
            sample = summary["sample"].reshape(-1)
            packed[row, 0] = index
            packed[row, 1] = len(summary["sample"])
            packed[row, 2 : 2 + self.matrix] = summary["mean"].reshape(-1)
            packed[row, 2 + self.matrix : 2 + self.matrix + _GAINS] = summary["gains"]
            start = 2 + self.matrix + _GAINS
            packed[row, start : start + len(sample)] = sample
        return packed

    def _unpack(self, stages: list[Tensor]) -> dict[int, dict[str, Tensor]]:
        size = self.size
        summaries = {}
        for row in torch.cat(stages).cpu():
            if row[0] < 0:
                continue
            count = int(row[1])
            start = 2 + self.matrix + _GAINS
            summaries[int(row[0])] = {
                "mean": row[2 : 2 + self.matrix].view(size, size),
                "gains": row[2 + self.matrix : start],
                "sample": row[start : start + count * self.matrix].view(count, size, size),
            }
        return summaries
