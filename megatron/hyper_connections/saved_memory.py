"""What autograd keeps for backward: the measure of the activation-memory targets.

Counted with saved-tensor hooks, so it is exact and hardware independent: each distinct
storage counts once however many ops save it (X saved by the width and the depth connection
is one tensor), and parameters, which are held anyway, are left out.
"""

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["saved_tensor_bytes"]

T = TypeVar("T")


def saved_tensor_bytes(forward: Callable[[], T], exclude: Iterable[Tensor] = ()) -> tuple[T, int]:
    """Run ``forward`` and count the bytes of the distinct storages that autograd saves for
    backward meanwhile, except those of ``exclude`` (e.g. the model's parameters).

    Returns what ``forward`` returned (backpropagate it, or drop it, to free the graph) and the
    byte count. Only ``forward`` is counted: what a later backward saves is transient.
    """
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return result, sum(storages.values())
