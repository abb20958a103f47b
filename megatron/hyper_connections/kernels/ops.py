"""The fused backend's ``autograd.Ops``: each pass over the state is one Triton kernel.

Dispatch only; the kernels are in this package's other modules (one per fused operation).
Importing this module needs Triton.
"""

from .branch_input import fused_branch_input, fused_branch_input_backward
from .merge_branch_output import fused_merge_branch_output, fused_merge_branch_output_backward
from .mhc_coefficients import fused_mhc_coefficients
from .mhc_lite_coefficients import fused_mhc_lite_coefficients
from .rms_projection import fused_rms_projection, fused_rms_projection_backward

__all__ = ["TritonOps"]


class TritonOps:
    """``autograd.TorchOps``'s static methods on the kernels, and mHC's and mHC-lite's
    coefficients (autograd functions, for the small graph rebuilt in backward)."""

    project = staticmethod(fused_rms_projection)
    project_backward = staticmethod(fused_rms_projection_backward)
    branch_input = staticmethod(fused_branch_input)
    branch_input_backward = staticmethod(fused_branch_input_backward)
    merge = staticmethod(fused_merge_branch_output)
    merge_backward = staticmethod(fused_merge_branch_output_backward)
    mhc_coefficients = staticmethod(fused_mhc_coefficients)
    mhc_lite_coefficients = staticmethod(fused_mhc_lite_coefficients)
