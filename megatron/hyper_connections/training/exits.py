"""When a training run ends before ``--train-iters``, and how (Megatron-LM's flags).

- A non-finite (NaN or inf) loss or gradient, with ``--check-for-nan-in-loss-and-grad`` (on by
  default): looked for after backward and before the optimizer applies the update, so the
  model keeps the weights of the last good step; every rank raises ``NonFiniteError`` and the
  run ends with an error (exit status 1). Under fp16 a non-finite gradient is the loss
  scaler's overflow signal (megatron-core skips that update and lowers the scale), so only the
  loss is checked there. No checkpoint of a non-finite model is ever written
  (``checkpoints.save_training_checkpoint`` refuses one).
- SIGTERM with ``--exit-signal-handler`` (what SLURM and most schedulers send before they
  preempt or time out a job), ``--exit-duration-in-mins`` and ``--exit-interval``: the current
  step finishes, a checkpoint is saved (with ``--save``) and the run ends normally (exit
  status 0). A SIGTERM is remembered from the moment ``ExitConditions`` is entered, set-up
  included. SLURM signals every process of a job step and torchrun passes the signal on to
  each rank's process group, which holds the processes the save needs (megatron-core's
  checkpoint writers and the manager of their result queue) and the data loader's workers:
  so SIGTERM is blocked in the rank and in every process it starts, and the check reads it
  as pending; it never kills them (SIGKILL still does).

What only some ranks see (the loss lives on the last pipeline stage, a gradient on its own
rank, a signal or a clock on any rank) is combined by one all-reduce per step, of four flags,
so that every rank takes the same decision at the same step. Without any of these options
there is no such all-reduce and the step never waits for the device.
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Sequence
from multiprocessing import resource_tracker
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ExitConditions", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or parameter: the run stops (or a checkpoint is refused)."""


class ExitConditions:
    """The conditions that end a run early (see the module docstring), for one run.

    ``check_step(iteration, loss, model)`` after backward and before the update of each
    step: raises ``NonFiniteError``, or returns why the run ends after this step (None: it
    goes on). Collective. As a context manager, with ``--exit-signal-handler``, it blocks
    SIGTERM and installs its handler on entry, and puts both back on exit.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()  # --exit-duration-in-mins counts set-up too
        self._signalled = False
        self._previous_handler: Any = None
        self._previous_mask: set[signal.Signals] = set()

    def __enter__(self) -> ExitConditions:
        if self.args.exit_signal_handler:
            # Blocked here, the signal stays pending (``signal_received``); a thread that
            # started earlier and does not block it runs the handler, which only notes it.
            # multiprocessing unblocks SIGTERM after it starts its resource tracker (which
            # ignores the signal itself): start that first.
            resource_tracker.ensure_running()
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
            self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.args.exit_signal_handler:
            # A pending SIGTERM reaches the handler as it is unblocked, not the old handler.
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            signal.signal(signal.SIGTERM, self._previous_handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a note: the step in progress finishes, and the next check saves and exits.
        self._signalled = True

    @property
    def signal_received(self) -> bool:
        """Whether this process has received SIGTERM since it entered."""
        return self._signalled or signal.SIGTERM in signal.sigpending()

    def check_step(self, iteration: int, loss: Tensor, model: Sequence[Any]) -> str | None:
        """Check step ``iteration`` before its update: ``loss`` is this rank's [loss sum,
        tokens] (zeros off the last pipeline stage), ``model`` its DDP-wrapped chunks."""
        args = self.args
        check_values = args.check_for_nan_in_loss_and_grad
        limit = args.exit_duration_in_mins
        minutes = (time.monotonic() - self.started) / 60
        reason = None
        if check_values or args.exit_signal_handler or limit is not None:
            flags = torch.zeros(4, device=loss.device)
            if check_values:
                flags[0] = ~torch.isfinite(loss[0])
                if not args.fp16:
                    flags[1] = ~_gradients_are_finite(model)
            flags[2] = self.signal_received
            flags[3] = limit is not None and minutes > limit
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            loss_bad, gradient_bad, signalled, late = (bool(flag) for flag in flags.tolist())
            if loss_bad or gradient_bad:
                what = "loss" if loss_bad else "gradient"
                raise NonFiniteError(
                    f"iteration {iteration}: the {what} is not finite (NaN or inf); stopped "
                    "before the update (--check-for-nan-in-loss-and-grad), so the model and its "
                    "last checkpoint are finite: lower --lr or clip the gradients "
                    "(--clip-grad) and resume with --load, or give "
                    "--no-check-for-nan-in-loss-and-grad to train on regardless"
                )
            if signalled:
                reason = "exiting after receiving SIGTERM (--exit-signal-handler)"
            elif late:
                reason = f"exiting after {minutes:.1f} minutes (--exit-duration-in-mins {limit:g})"
        if reason is None and args.exit_interval and iteration % args.exit_interval == 0:
            reason = f"exiting at iteration {iteration} (--exit-interval {args.exit_interval})"
        return reason


def _gradients_are_finite(model: Sequence[Any]) -> Tensor:
    """Whether this rank's gradient buffers (megatron-core DDP) hold only finite values, as a
    0-dim bool tensor (no host sync)."""
    finite = torch.ones((), dtype=torch.bool)
    for chunk in model:
        for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]:
            finite = finite.to(buffer.grad_data.device) & torch.isfinite(buffer.grad_data).all()
    return finite
