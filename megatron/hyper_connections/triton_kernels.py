"""Moved: the kernels are in ``kernels`` (one module per fused operation), the policy in
``kernels.availability``. Left only for ``config.py``'s Triton check until it reads
``kernels.availability.HAVE_TRITON``; delete this module then."""

from .kernels.availability import HAVE_TRITON

__all__ = ["HAVE_TRITON"]
