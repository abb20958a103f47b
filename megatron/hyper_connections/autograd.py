"""Memory-lean autograd for the width and depth connections of one sublayer.

Written with plain autograd, a sublayer saves the state X [n*C per token] once more for
every op that reads it (the RMS norm, the projection's input, the two stream matmuls) plus
intermediates such as every Sinkhorn iteration. These functions save only what their
backward needs:

- ``LeanWidthConnection``: (h0, H_post, H_res) from X, saving X only.
- ``LeanDepthConnection``: X' = H_res X + H_post^T y with y = dropout(out + bias) (the
  dropout in the fused kernel only), with a hand-written backward, saving the branch output
  only; X comes from the state shared with the width connection.

In backward the coefficients are rebuilt from X once (the projection, one pass over X, then
the small graph after it, Sinkhorn included, with autograd) and shared by the two functions
through the sublayer's ``SavedState``. The depth connection's share of dX, H_res^T dX', is
handed to the width connection's backward (which always runs later), which completes it in
place with H_pre^T dh0 and the projection's share: autograd never adds two n*C gradients.

The passes over the state are ``Ops``: ``TorchOps`` here (the lean backend), or the Triton
kernels of ``kernels.ops.TritonOps`` (the fused backend); see ``backends``.

Per transformer layer that is 2 (n + 1) units of one [s, b, C] activation beyond the
residual layer: X and y for each of its two sublayers. With a ``StateChain`` (the mHC
paper's recomputation) X is kept only at the first sublayer of every block of sublayers and
rebuilt in backward from the kept state and the y's, which the depth connections keep anyway.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .projection import Projection, rms_projection, rms_projection_backward
from .streams import (
    BranchOutput,
    Mixing,
    branch_input,
    coefficient_dtype,
    merge_branch_output,
    per_token_matmul,
)

if TYPE_CHECKING:
    from .backends import Backend
    from .hyper_connection import HyperConnectionBase

__all__ = [
    "LeanDepthConnection",
    "LeanWidthConnection",
    "Ops",
    "SavedState",
    "StateChain",
    "TorchOps",
]


class TorchOps:
    """The passes over the state that the lean functions make, in PyTorch, forward values
    only (no autograd graph): ``rows`` X [T, N, D] in the state's dtype, computed in the
    coefficients' dtype, in which the gradients of X are accumulated in place.
    ``kernels.ops.TritonOps`` has the same static methods, each a Triton kernel."""

    project = staticmethod(rms_projection)
    """``Projection`` of ``inputs`` [T, R, K] with the weight: (inputs, weight, eps)."""
    project_backward = staticmethod(rms_projection_backward)
    """dW, and d inputs added to ``grad_inputs``: (inputs, weight, projection, grad,
    grad_inputs)."""
    branch_input = staticmethod(branch_input)
    """h0 = H_pre X [T, k*D] in the rows' dtype: (rows, h_pre)."""

    @staticmethod
    def branch_input_backward(
        rows: Tensor, h_pre: Tensor, grad: Tensor, grad_rows: Tensor | None
    ) -> Tensor:
        """dH_pre = dh0 X^T (per token); adds H_pre^T dh0 to ``grad_rows``."""
        grad = grad.to(h_pre.dtype).unflatten(-1, (-1, rows.shape[-1]))  # [T, k, D]
        grad_pre = per_token_matmul(grad, rows.to(h_pre.dtype).transpose(-1, -2))
        if grad_rows is not None:
            h_pre_t = h_pre.transpose(-1, -2)
            if grad.shape[-2] > 1:
                grad_rows.add_(per_token_matmul(h_pre_t, grad))
            else:  # k = 1: an outer product, done in place
                grad_rows.addcmul_(h_pre_t, grad)
        return grad_pre

    @staticmethod
    def merge(rows: Tensor, branch: BranchOutput, h_post: Tensor, h_res: Tensor) -> Tensor:
        """X' = H_res X + H_post^T (out + bias), [T, N*D] in the rows' dtype. No dropout: the
        lean backend drops the branch output with torch's dropout, in autograd, before."""
        if branch.hidden_dropout > 0.0:
            raise ValueError(
                f"TorchOps.merge applies no dropout, got hidden_dropout={branch.hidden_dropout}: "
                f"drop the branch output with torch's dropout first"
            )
        compute = h_res.dtype
        y = _branch_y(branch).to(compute)
        return merge_branch_output(rows.to(compute), y, h_post, h_res).to(rows.dtype)

    @staticmethod
    def merge_backward(
        rows: Tensor, branch: BranchOutput, h_post: Tensor, h_res: Tensor, grad: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """(dX [T, N, D], d out, d bias, dH_post, dH_res (per token)) for dX' ``grad``."""
        compute = h_res.dtype
        row_size = rows.shape[-1]
        # contiguous: a broadcast gradient (e.g. of a sum) would make bmm go token by token
        grad = grad.to(compute).contiguous().unflatten(-1, (-1, row_size))  # dX' [T, N, D]
        y_rows = _branch_y(branch).to(compute).unflatten(-1, (-1, row_size))  # [T, k, D]
        grad_rows = per_token_matmul(h_res.transpose(-1, -2), grad)
        grad_res = per_token_matmul(grad, rows.to(compute).transpose(-1, -2))  # dX' X^T
        if y_rows.shape[-2] == 1:  # every row received the same y: matmuls, no temporaries
            grad_post = per_token_matmul(grad, y_rows.transpose(-1, -2)).squeeze(-1)
            grad_y = per_token_matmul(h_post.unsqueeze(-2), grad)
        else:
            grad_post = (grad * y_rows).sum(dim=-1)
            grad_y = h_post.unsqueeze(-1) * grad
        grad_out = grad_y.flatten(-2).to(branch.out.dtype)
        bias = branch.bias
        grad_bias = None if bias is None else grad_out.sum(dim=0).to(bias.dtype)
        return grad_rows, grad_out, grad_bias, grad_post, grad_res


Ops = type[TorchOps]
"""``TorchOps`` or a class with the same static methods (``kernels.ops.TritonOps``)."""


def _branch_y(branch: BranchOutput) -> Tensor:
    return branch.out if branch.bias is None else branch.out + branch.bias


class SavedState:
    """The input state X of one sublayer as kept for backward, and what the sublayer's two
    backward functions share.

    X is the tensor itself, or a recipe to rebuild it from the previous sublayer's state:
    X = H_res X_prev + H_post^T y_prev. The coefficients are rebuilt from X once per backward,
    with their autograd graph, by whichever of the two functions needs them first.
    """

    def __init__(
        self,
        tensor: Tensor | None = None,
        previous: "SavedState | None" = None,
        merged: tuple[Ops, BranchOutput] | None = None,
    ) -> None:
        self.tensor = tensor
        # The recipe: the previous state and (how, what) its depth connection merged into it.
        self.previous = previous
        self.merged = merged
        self.kept = tensor is not None
        # Set by the width connection: the sublayer's module and the backend it ran on.
        self.module: HyperConnectionBase | None = None
        self.backend: Backend | None = None
        self.coefficients: tuple[Projection | None, Mixing] | None = None
        # dX from the depth connection's backward, which the width connection's backward
        # (always later) completes in place: no separate gradient for autograd to add up.
        self.grad: Tensor | None = None

    def get(self, like: tuple[torch.Size, torch.dtype]) -> Tensor:
        if self.tensor is None:
            shape, _dtype = like
            previous = self.previous.get(like)
            _, mixing = self.previous.rebuild_coefficients(previous)
            ops, branch = self.merged
            with torch.no_grad():
                rows = ops.merge(previous, branch, mixing.h_post, mixing.h_res)
            self.tensor = rows.view(shape)
        return self.tensor

    def rebuild_coefficients(self, rows: Tensor) -> tuple[Projection | None, Mixing]:
        """(projection, H_pre/H_post/H_res) of X, the projection as autograd leaves and the
        coefficients with their graph on it and on the module's parameters."""
        if self.coefficients is None:
            dtype = coefficient_dtype(rows)
            with torch.no_grad():
                projection = self.module.project(rows, dtype, self.backend.ops)
            if projection is not None:
                projection = Projection(*(t.detach().requires_grad_() for t in projection))
            with torch.enable_grad():
                mixing = self.module.coefficients(projection, dtype, self.backend)
            self.coefficients = (projection, mixing)
        return self.coefficients

    def release(self) -> None:
        """Forget what was rebuilt once the sublayer's backward is done: backward runs from
        the last sublayer to the first, so nothing later needs it."""
        self.coefficients = None
        if not self.kept:
            self.tensor = None


class StateChain:
    """Decides in forward, sublayer by sublayer, which states are kept and which rebuilt.

    One chain serves the hyper-connections of one ``TransformerBlock`` (a pipeline stage or
    virtual stage); ``block_size`` consecutive sublayers share one kept state.
    """

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._next: tuple[int, SavedState] | None = None  # (data_ptr of X', recipe for it)

    def state_for(self, position: int, rows: Tensor) -> SavedState:
        follows = self._next is not None and self._next[0] == rows.data_ptr()
        state = self._next[1] if follows and position % self.block_size else SavedState(rows)
        self._next = None
        return state

    def record_output(self, output: Tensor, state: SavedState) -> None:
        self._next = (output.data_ptr(), state)


class LeanWidthConnection(torch.autograd.Function):
    """(h0, H_post, H_res) = f(X; parameters of ``module``) on ``backend``, keeping X only."""

    @staticmethod
    def forward(
        ctx,
        module: "HyperConnectionBase",
        backend: "Backend",
        rows: Tensor,
        state: SavedState,
        *params: Tensor,
    ):
        ctx.state, ctx.params = state, params
        ctx.like = (rows.shape, rows.dtype)
        state.module, state.backend = module, backend
        dtype = coefficient_dtype(rows)
        projection = module.project(rows, dtype, backend.ops)
        mixing = module.coefficients(projection, dtype, backend)
        h0 = backend.ops.branch_input(rows, mixing.h_pre)
        # The state itself is `state.tensor`; with a state chain it is saved once per block.
        ctx.save_for_backward(rows if state.kept else None)
        h_post, h_res = mixing.h_post, mixing.h_res
        if h_res.dim() == 2:  # static coefficients are (views of) parameters: return copies
            h_post, h_res = h_post.clone(), h_res.clone()
        return h0, h_post, h_res

    @staticmethod
    def backward(ctx, grad_h0: Tensor | None, grad_post: Tensor | None, grad_res: Tensor | None):
        state, params = ctx.state, ctx.params
        module, ops = state.module, state.backend.ops
        rows = state.get(ctx.like)
        # The coefficients are a small graph on the projection (a few numbers per token),
        # usually rebuilt already by the depth connection's backward; feed it dH_pre = dh0 X^T,
        # dH_post and dH_res.
        projection, mixing = state.rebuild_coefficients(rows)
        dtype = mixing.h_res.dtype
        grad_rows = None
        if ctx.needs_input_grad[2]:
            grad_rows = (
                state.grad if state.grad is not None else rows.new_zeros(rows.shape, dtype=dtype)
            )
        state.grad = None
        grad_pre = None
        if grad_h0 is not None:  # dH_pre, and dX += H_pre^T dh0 in the same pass
            h_pre = mixing.h_pre.detach()
            grad_pre = _sum_to(
                ops.branch_input_backward(rows, h_pre, grad_h0, grad_rows), h_pre.shape
            )
        leaves = list(projection or ()) + [
            p for p, need in zip(params, ctx.needs_input_grad[4:], strict=True) if need
        ]
        pairs = [
            (out, grad)
            for out, grad in zip(mixing, (grad_pre, grad_post, grad_res), strict=True)
            if grad is not None and out.requires_grad
        ]
        grads = {}
        if pairs and leaves:
            outputs, output_grads = zip(*pairs, strict=True)
            found = torch.autograd.grad(outputs, leaves, output_grads, allow_unused=True)
            grads = dict(zip(map(id, leaves), found, strict=True))
        state.release()
        if projection is not None:
            weight = module.dynamic_proj
            grad_projection = Projection(*(_zeros_if_none(grads.get(id(t)), t) for t in projection))
            inputs = module.projection_inputs(rows)
            grad_weight = ops.project_backward(
                inputs,
                weight.to(dtype),
                projection,
                grad_projection,
                None if grad_rows is None else grad_rows.view(inputs.shape),
            )
            if id(weight) in grads:
                grads[id(weight)] = grad_weight.to(weight.dtype)
        param_grads = [
            grads.get(id(p)) if need else None
            for p, need in zip(params, ctx.needs_input_grad[4:], strict=True)
        ]
        grad_rows = None if grad_rows is None else grad_rows.to(rows.dtype)
        return None, None, grad_rows, None, *param_grads


class LeanDepthConnection(torch.autograd.Function):
    """X' = H_res X + H_post^T y (flattened to [..., N*D]) with ``ops``, keeping the branch
    output only: X comes from the state shared with the width connection, H_post and H_res
    are rebuilt from it."""

    @staticmethod
    def forward(
        ctx,
        ops: Ops,
        rows: Tensor,
        branch: BranchOutput,
        h_post: Tensor,
        h_res: Tensor,
        state: SavedState,
        *branch_tensors: Tensor | None,
    ):
        """``branch_tensors``: ``branch``'s out and bias again, for autograd to see them."""
        ctx.ops, ctx.state, ctx.like = ops, state, (rows.shape, rows.dtype)
        ctx.dropout = (branch.hidden_dropout, branch.seed)
        ctx.coefficient_shapes = (h_post.shape, h_res.shape)
        ctx.save_for_backward(*branch_tensors)
        return ops.merge(rows, branch, h_post, h_res)

    @staticmethod
    def backward(ctx, grad: Tensor):
        branch = BranchOutput(*ctx.saved_tensors, *ctx.dropout)
        rows = ctx.state.get(ctx.like)
        _, mixing = ctx.state.rebuild_coefficients(rows)
        h_post, h_res = mixing.h_post.detach(), mixing.h_res.detach()
        grad_rows, grad_out, grad_bias, grad_post, grad_res = ctx.ops.merge_backward(
            rows, branch, h_post, h_res, grad
        )
        # H_res^T dX', completed by the width connection's backward (see SavedState.grad).
        ctx.state.grad = grad_rows
        post_shape, res_shape = ctx.coefficient_shapes
        grad_post, grad_res = _sum_to(grad_post, post_shape), _sum_to(grad_res, res_shape)
        return None, None, None, grad_post, grad_res, None, grad_out, grad_bias


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _sum_to(grad: Tensor, shape: Sequence[int]) -> Tensor:
    """Reduce the gradient of a broadcast static coefficient to the coefficient's shape."""
    if grad.shape == shape:
        return grad
    return grad.reshape(-1, *shape).sum(dim=0)
