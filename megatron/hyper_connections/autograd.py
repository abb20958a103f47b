"""Memory-lean autograd for the width and depth connections of one sublayer.

Written with plain autograd, a sublayer saves the state X [n*C per token] once more for
every op that reads it (the RMS norm, the projection's input, the two stream matmuls) plus
intermediates such as every Sinkhorn iteration. These functions save only what their
backward needs:

- ``WidthConnection``: (h0, H_post, H_res) from X, saving X only.
- ``DepthConnection``: X' = H_res X + H_post^T y with a hand-written backward, saving y only;
  X comes from the state shared with the width connection.

In backward the coefficients are rebuilt from X once (the projection, one pass over X, then
the small graph after it, Sinkhorn included, with autograd) and shared by the two functions
through the sublayer's ``SavedState``. The depth connection's share of dX, H_res^T dX', is
handed to the width connection's backward (which always runs later), which completes it in
place with H_pre^T dh0 and the projection's share: autograd never adds two n*C gradients.

Per transformer layer that is 2 (n + 1) units of one [s, b, C] activation beyond the
residual layer: X and y for each of its two sublayers. With a ``StateChain`` (the mHC
paper's recomputation) X is kept only at the first sublayer of every block of sublayers and
rebuilt in backward from the kept state and the y's, which the depth connections keep anyway.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .projection import Projection, rms_projection_backward
from .streams import Mixing, coefficient_dtype, depth_connection

__all__ = ["DepthConnection", "SavedState", "StateChain", "WidthConnection"]


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
        branch_output: Tensor | None = None,
    ) -> None:
        self.tensor = tensor
        self.previous = previous
        self.branch_output = branch_output  # y_prev of the recipe
        self.kept = tensor is not None
        self.module: nn.Module | None = None  # the sublayer's hyper-connection
        self.coefficients: tuple[Projection | None, Mixing] | None = None
        # dX from the depth connection's backward, which the width connection's backward
        # (always later) completes in place: no separate gradient for autograd to add up.
        self.grad: Tensor | None = None

    def get(self, like: tuple[torch.Size, torch.dtype]) -> Tensor:
        if self.tensor is None:
            shape, dtype = like
            previous = self.previous.get(like)
            _, mixing = self.previous.rebuild_coefficients(previous)
            compute = mixing.h_res.dtype
            with torch.no_grad():
                rows = depth_connection(
                    previous.to(compute),
                    self.branch_output.to(compute),
                    mixing.h_post,
                    mixing.h_res,
                )
            self.tensor = rows.to(dtype).view(shape)
        return self.tensor

    def rebuild_coefficients(self, rows: Tensor) -> tuple[Projection | None, Mixing]:
        """(projection, H_pre/H_post/H_res) of X, the projection as autograd leaves and the
        coefficients with their graph on it and on the module's parameters."""
        if self.coefficients is None:
            dtype = coefficient_dtype(rows)
            with torch.no_grad():
                projection = self.module.project(rows, dtype)
            if projection is not None:
                projection = Projection(*(t.detach().requires_grad_() for t in projection))
            with torch.enable_grad():
                mixing = self.module.coefficients(projection, dtype)
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


class WidthConnection(torch.autograd.Function):
    """(h0, H_post, H_res) = f(X; parameters of ``module``), keeping X only."""

    @staticmethod
    def forward(ctx, module: nn.Module, rows: Tensor, state: SavedState, *params: Tensor):
        ctx.state, ctx.params = state, params
        ctx.like = (rows.shape, rows.dtype)
        state.module = module
        dtype = coefficient_dtype(rows)
        mixing = module.coefficients(module.project(rows, dtype), dtype)
        h0 = module.branch_input(rows, mixing.h_pre)
        # The state itself is `state.tensor`; with a state chain it is saved once per block.
        ctx.save_for_backward(rows if state.kept else None)
        h_post, h_res = mixing.h_post, mixing.h_res
        if h_res.dim() == 2:  # static coefficients are (views of) parameters: return copies
            h_post, h_res = h_post.clone(), h_res.clone()
        return h0, h_post, h_res

    @staticmethod
    def backward(ctx, grad_h0: Tensor | None, grad_post: Tensor | None, grad_res: Tensor | None):
        state, params = ctx.state, ctx.params
        module = state.module
        rows = state.get(ctx.like)
        # The coefficients are a small graph on the projection (a few numbers per token),
        # usually rebuilt already by the depth connection's backward; feed it dH_pre = dh0 X^T,
        # dH_post and dH_res.
        projection, mixing = state.rebuild_coefficients(rows)
        dtype = mixing.h_res.dtype
        x = rows.to(dtype)
        leaves = list(projection or ()) + [
            p for p, need in zip(params, ctx.needs_input_grad[3:], strict=True) if need
        ]
        grad_h0 = None if grad_h0 is None else grad_h0.to(dtype).unflatten(-1, (-1, x.shape[-1]))
        grad_pre = (
            None if grad_h0 is None else _sum_to(grad_h0 @ x.transpose(-1, -2), mixing.h_pre.shape)
        )
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

        grad_rows = None
        if ctx.needs_input_grad[1]:
            grad_rows = state.grad if state.grad is not None else torch.zeros_like(x)
        state.grad = None
        state.release()
        if projection is not None:
            weight = module.dynamic_proj
            grad_projection = Projection(*(_zeros_if_none(grads.get(id(t)), t) for t in projection))
            inputs = module.projection_inputs(x)
            grad_weight = rms_projection_backward(
                inputs,
                weight.to(dtype),
                projection,
                grad_projection,
                None if grad_rows is None else grad_rows.view_as(inputs),
            )
            if id(weight) in grads:
                grads[id(weight)] = grad_weight.to(weight.dtype)
        if grad_rows is not None and grad_h0 is not None:
            # dX += H_pre^T dh0; for k = 1 an outer product, done in place.
            h_pre_t = mixing.h_pre.detach().transpose(-1, -2)
            if grad_h0.shape[-2] > 1:
                grad_rows.add_(h_pre_t @ grad_h0)
            else:
                grad_rows.addcmul_(h_pre_t, grad_h0)
        param_grads = [
            grads.get(id(p)) if need else None
            for p, need in zip(params, ctx.needs_input_grad[3:], strict=True)
        ]
        return None, None if grad_rows is None else grad_rows.to(rows.dtype), None, *param_grads


class DepthConnection(torch.autograd.Function):
    """X' = H_res X + H_post^T y (flattened to [..., N*D]), keeping y only: X comes from the
    state shared with the width connection, H_post and H_res are rebuilt from it."""

    @staticmethod
    def forward(ctx, rows: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, state: SavedState):
        ctx.state, ctx.like, ctx.y_dtype = state, (rows.shape, rows.dtype), y.dtype
        ctx.coefficient_shapes = (h_post.shape, h_res.shape)
        ctx.save_for_backward(y)
        compute = h_res.dtype
        return depth_connection(rows.to(compute), y.to(compute), h_post, h_res).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (y,) = ctx.saved_tensors
        rows = ctx.state.get(ctx.like)
        _, mixing = ctx.state.rebuild_coefficients(rows)
        h_post, h_res = mixing.h_post.detach(), mixing.h_res.detach()
        compute = h_res.dtype
        row_size = rows.shape[-1]
        # contiguous: a broadcast gradient (e.g. of a sum) would make bmm go token by token
        grad = grad_out.to(compute).contiguous().unflatten(-1, (-1, row_size))  # dX' [T, N, D]
        y_rows = y.to(compute).unflatten(-1, (-1, row_size))  # [..., k, D], k = 1 or N

        # H_res^T dX', completed by the width connection's backward (see SavedState.grad).
        ctx.state.grad = h_res.transpose(-1, -2) @ grad
        grad_res = grad @ rows.to(compute).transpose(-1, -2)  # dX' X^T
        if y_rows.shape[-2] == 1:  # every row received the same y: matmuls, no temporaries
            grad_post = (grad @ y_rows.transpose(-1, -2)).squeeze(-1)
            grad_y = h_post.unsqueeze(-2) @ grad
        else:
            grad_post = (grad * y_rows).sum(dim=-1)
            grad_y = h_post.unsqueeze(-1) * grad
        return (
            None,
            grad_y.flatten(-2).to(ctx.y_dtype),
            _sum_to(grad_post, ctx.coefficient_shapes[0]),
            _sum_to(grad_res, ctx.coefficient_shapes[1]),
            None,
        )


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _sum_to(grad: Tensor, shape: Sequence[int]) -> Tensor:
    """Reduce the gradient of a broadcast static coefficient to the coefficient's shape."""
    if grad.shape == shape:
        return grad
    return grad.reshape(-1, *shape).sum(dim=0)
