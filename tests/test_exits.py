"""The trainer's early exits (``training.exits``) in one gloo process: each condition, the
one all-reduce that combines them, and the SIGTERM handler's way in and out. The runs through
the entry point are in test_pretrain.py."""

from __future__ import annotations

import argparse
import math
import signal
import threading
import time

import pytest
import torch

from megatron.hyper_connections.training.exits import ExitConditions, NonFiniteError
from tests.models import build_gpt, ddp, ddp_step, lm_batch, make_config

FINITE = torch.tensor([3.0, 4.0])  # [loss sum, tokens]


def _args(**flags: object) -> argparse.Namespace:
    defaults = dict(
        check_for_nan_in_loss_and_grad=True,
        exit_signal_handler=False,
        exit_duration_in_mins=None,
        exit_interval=None,
        fp16=False,
    )
    return argparse.Namespace(**{**defaults, **flags})


def test_nothing_to_report_goes_on(megatron_single_rank) -> None:
    with ExitConditions(_args()) as exits:
        assert [exits.check_step(i, FINITE, []) for i in (1, 2)] == [None, None]


def test_non_finite_loss_and_gradient_stop_before_the_update(megatron_single_rank) -> None:
    model = ddp(build_gpt(make_config()))
    ddp_step(model, lm_batch(0))
    with ExitConditions(_args()) as exits:
        assert exits.check_step(1, FINITE, [model]) is None
        with pytest.raises(NonFiniteError, match=r"^iteration 2: the loss is not finite"):
            exits.check_step(2, torch.tensor([math.inf, 4.0]), [model])
        model.buffers[0].grad_data[-1] = math.nan
        with pytest.raises(NonFiniteError, match=r"^iteration 3: the gradient is not finite"):
            exits.check_step(3, FINITE, [model])
    # Under fp16 a non-finite gradient is the loss scaler's overflow: megatron skips the step.
    with ExitConditions(_args(fp16=True)) as exits:
        assert exits.check_step(3, FINITE, [model]) is None
    with ExitConditions(_args(check_for_nan_in_loss_and_grad=False)) as exits:
        assert exits.check_step(3, torch.tensor([math.nan, 4.0]), [model]) is None


def test_exit_interval_and_duration(megatron_single_rank) -> None:
    with ExitConditions(_args(exit_interval=3)) as exits:
        reasons = [exits.check_step(i, FINITE, []) for i in (1, 2, 3)]
    assert reasons == [None, None, "exiting at iteration 3 (--exit-interval 3)"]
    with ExitConditions(_args(exit_duration_in_mins=1e-4)) as exits:
        assert exits.check_step(1, FINITE, []) is None
        time.sleep(0.01)
        assert exits.check_step(2, FINITE, []) == (
            "exiting after 0.0 minutes (--exit-duration-in-mins 0.0001)"
        )


def test_sigterm_is_held_until_the_check_and_the_previous_handler_returns(
    megatron_single_rank,
) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with ExitConditions(_args(exit_signal_handler=True)) as exits:
        assert exits.check_step(1, FINITE, []) is None
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        assert signal.SIGTERM in signal.sigpending()  # blocked: it killed nothing
        assert exits.signal_received
        reason = exits.check_step(2, FINITE, [])
    assert reason == "exiting after receiving SIGTERM (--exit-signal-handler)"
    # Unblocked on the way out, the pending signal went to the trainer's handler, not the old.
    assert signal.SIGTERM not in signal.sigpending()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
