"""Shared fixtures: a one-process megatron-core set-up and tiny GPT builders."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are defined for its interpreter, so their tests run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def megatron_single_rank():
    """torch.distributed with one gloo rank and megatron-core's parallel state, TP = PP = 1."""
    from megatron.hyper_connections.cpu_compat import destroy_distributed, initialize_distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(2)
    initialize_distributed()
    yield
    destroy_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
