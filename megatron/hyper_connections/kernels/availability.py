"""When the fused kernels can run: the policy, apart from the kernels themselves.

Importing this module never needs Triton. ``supported`` and ``unsupported_reason`` say whether
given tensors can go through the kernels (fp32, bf16 or fp16, on CUDA, or on any device when
the kernels were defined for Triton's interpreter); ``check`` raises where they cannot.
"""

import functools

import torch
from torch import Tensor

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # the package stays importable; the fused backend is then never chosen
    HAVE_TRITON = False

__all__ = ["DTYPES", "HAVE_TRITON", "check", "supported", "unsupported_reason"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the kernels read and write; they compute in fp32 (fp64 is not supported)."""


@functools.cache
def _interpreted() -> bool:
    # Fixed once the kernels are defined (see ``triton_utils.interpreted``); asked per call.
    from . import triton_utils

    return triton_utils.interpreted()


def unsupported_reason(*tensors: Tensor | None) -> str | None:
    """Why the kernels cannot take ``tensors`` (None entries are ignored), or None if they can."""
    if not HAVE_TRITON:
        return "Triton is not installed"
    given = [t for t in tensors if t is not None]
    bad_dtypes = sorted({str(t.dtype) for t in given if t.dtype not in DTYPES})
    if bad_dtypes:
        return f"the kernels take fp32, bf16 or fp16 tensors, got {', '.join(bad_dtypes)}"
    if not _interpreted():
        devices = sorted({str(t.device) for t in given if not t.is_cuda})
        if devices:
            return (
                f"the kernels take CUDA tensors (any device under TRITON_INTERPRET=1), got "
                f"{', '.join(devices)}"
            )
    return None


def supported(*tensors: Tensor | None) -> bool:
    """Whether the kernels can run on ``tensors`` (None entries are ignored)."""
    return unsupported_reason(*tensors) is None


def check(*tensors: Tensor | None) -> None:
    """Raise ``ValueError`` (``RuntimeError`` without Triton) unless ``supported(*tensors)``."""
    reason = unsupported_reason(*tensors)
    if reason is None:
        return
    if not HAVE_TRITON:
        raise RuntimeError(f"the fused kernels need Triton: {reason}")
    raise ValueError(f"the fused kernels cannot run here: {reason}")
