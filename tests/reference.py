"""A plain, independent reference of the paper equations, for tests only.

Written from /work/shared/reference/hyper-connections.md (sections 2, 3, 4 and 6), per token,
with explicit loops over streams and rows, in float64, and without importing anything from
``megatron.hyper_connections``. Tiny sizes only: it is meant to be obviously right, not fast.

Each ``*_sublayer`` function takes the flat state ``[..., N*D]``, a branch F that maps one
token's C-vector to a C-vector, and the parameters as explicit tensors (so a test can pass the
package module's own parameters after randomising them). It returns ``(h0, new_state)``:
the branch input ``[..., C]`` and the new state ``[..., N*D]``, and ``h_res`` ``[..., N, N]``
(the residual mixing matrix in the destination-row convention X' = H_res X + ...).

The forms are the papers' own, not the package's: for HC, h0 = A_m^T X and
X' = A_r^T X + B^T y with A_r[j, i] the weight of source stream j into destination stream i.

Normalisation: the papers write norm(x) and r = ||x||_2 / sqrt(len(x)); as for any RMSNorm an
epsilon goes inside the square root, r = sqrt(mean(x^2) + eps). ``eps`` is an argument so the
tests can use the same value as the module under test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

Branch = Callable[[Tensor], Tensor]

__all__ = [
    "backward_gain",
    "composite_gains",
    "forward_gain",
    "frac_sublayer",
    "hc_sublayer",
    "log_amax",
    "mhc_sublayer",
    "sinkhorn",
]


def _rms(v: Tensor, eps: float) -> Tensor:
    """sqrt(mean(v^2) + eps) of a 1-D vector, written out."""
    total = sum(float(value) ** 2 for value in v)
    return torch.tensor(math.sqrt(total / len(v) + eps), dtype=torch.float64)


def _per_token(
    state: Tensor, token_fn: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply ``token_fn`` (flat token state -> (h0, new state, h_res)) to every token."""
    flat = state.to(torch.float64).reshape(-1, state.shape[-1])
    outputs = [token_fn(flat[t]) for t in range(flat.shape[0])]
    lead = state.shape[:-1]
    h0 = torch.stack([o[0] for o in outputs]).reshape(*lead, -1)
    new_state = torch.stack([o[1] for o in outputs]).reshape(*lead, -1)
    h_res = torch.stack([o[2] for o in outputs])
    return h0, new_state, h_res.reshape(*lead, *h_res.shape[-2:])


# --------------------------------------------------------------------------------------------
# Section 2 (HC) and section 4 (Frac): the same per-token equations, with the branch reading
# k = 1 mixed row (HC) or k = m mixed rows concatenated back to C values (Frac).
# --------------------------------------------------------------------------------------------


def _hc_token(
    x: Tensor,
    num_rows: int,
    branch: Branch,
    A_m: Tensor,
    A_r: Tensor,
    B: Tensor,
    W_m: Tensor | None,
    W_r: Tensor | None,
    W_b: Tensor | None,
    s_a: float,
    s_b: float,
    use_tanh: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token of HC (k = 1) or Frac (k = N): x is the flat state, N rows of D values."""
    N = num_rows
    D = x.shape[0] // N
    k = A_m.shape[1]
    X = [x[j * D : (j + 1) * D] for j in range(N)]
    act: Callable[[Tensor], Tensor] = torch.tanh if use_tanh else (lambda v: v)

    # Dynamic coefficients: row j from row j's own normalised vector.
    Am = torch.zeros(N, k, dtype=torch.float64)
    Ar = torch.zeros(N, N, dtype=torch.float64)
    Bx = torch.zeros(N, dtype=torch.float64)
    for j in range(N):
        Xn_j = X[j] / _rms(X[j], eps)
        for r in range(k):
            Am[j, r] = A_m[j, r]
            if W_m is not None:
                Am[j, r] += s_a * act(Xn_j @ W_m[:, r])
        for i in range(N):
            Ar[j, i] = A_r[j, i]
            if W_r is not None:
                Ar[j, i] += s_a * act(Xn_j @ W_r[:, i])
        Bx[j] = B[j]
        if W_b is not None:
            Bx[j] += s_b * act(Xn_j @ W_b[:, 0])

    # h0 = A_m(X)^T X: k rows, row r = sum_j A_m[j, r] X_j, concatenated.
    h0_rows = [sum(Am[j, r] * X[j] for j in range(N)) for r in range(k)]
    h0 = torch.cat(h0_rows)
    y = branch(h0)
    # y's share for row i: the whole of y for HC (k = 1), its i-th fraction for Frac (k = N).
    y_rows = [y] * N if k == 1 else [y[i * D : (i + 1) * D] for i in range(N)]

    # X' = A_r(X)^T X + B(X)^T y: row i = sum_j A_r[j, i] X_j + B[i] y_i.
    new_rows = [sum(Ar[j, i] * X[j] for j in range(N)) + Bx[i] * y_rows[i] for i in range(N)]
    h_res = Ar.T.clone()  # destination-row convention: H_res[i, j] = A_r[j, i]
    return h0, torch.cat(new_rows), h_res


def hc_sublayer(
    state: Tensor,
    num_streams: int,
    branch: Branch,
    A_m: Tensor,
    A_r: Tensor,
    B: Tensor,
    W_m: Tensor | None = None,
    W_r: Tensor | None = None,
    W_b: Tensor | None = None,
    s_a: float = 0.0,
    s_b: float = 0.0,
    use_tanh: bool = True,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hyper-Connections (DHC, or SHC with all W None) around ``branch``, per token.

    Args:
        state: [..., n*C]. A_m: [n] or [n, 1]. A_r: [n, n]. B: [n].
        W_m: [C, 1], W_r: [C, n], W_b: [C, 1] (None for static HC). s_a, s_b: scalars.
    Returns:
        h0 [..., C], new state [..., n*C], H_res = A_r(X)^T [..., n, n].
    """
    A_m = A_m.double().reshape(num_streams, 1)
    args = _hc_args(A_r, B, W_m, W_r, W_b, s_a, s_b)
    return _per_token(
        state,
        lambda x: _hc_token(x, num_streams, branch, A_m, *args, use_tanh=use_tanh, eps=eps),
    )


def frac_sublayer(
    state: Tensor,
    num_fracs: int,
    branch: Branch,
    Y: Tensor,
    A: Tensor,
    B: Tensor,
    W_y: Tensor | None = None,
    W_a: Tensor | None = None,
    W_b: Tensor | None = None,
    s_a: float = 0.0,
    s_b: float = 0.0,
    use_tanh: bool = True,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Frac-Connections: one stream's C-vector split into m fractions of C/m values.

    Y [m, m] reads the fractions into the branch input (h0 = Y(X)^T X, m fractions
    concatenated back to C), A [m, m] mixes them (X' = A(X)^T X + ...), B [m] scales the
    branch output's fractions. Dynamic part as in HC with a per-fraction norm:
    W_y [C/m, m], W_a [C/m, m], W_b [C/m, 1].
    """
    Y = Y.double()
    args = _hc_args(A, B, W_y, W_a, W_b, s_a, s_b)
    return _per_token(
        state, lambda x: _hc_token(x, num_fracs, branch, Y, *args, use_tanh=use_tanh, eps=eps)
    )


def _hc_args(
    A_r: Tensor,
    B: Tensor,
    W_m: Tensor | None,
    W_r: Tensor | None,
    W_b: Tensor | None,
    s_a: float,
    s_b: float,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, float, float]:
    def f64(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().double()

    return (
        A_r.detach().double(),
        B.detach().double().reshape(-1),
        f64(W_m),
        f64(W_r),
        f64(W_b),
        float(s_a),
        float(s_b),
    )


# --------------------------------------------------------------------------------------------
# Section 3: mHC.
# --------------------------------------------------------------------------------------------


def sinkhorn(T: Tensor, num_iters: int) -> Tensor:
    """Sinkhorn-Knopp of one n x n logit matrix as the mHC paper writes it: M0 = exp(T), then
    ``num_iters`` times normalise columns, then rows (fp64, moderate logits; entries are kept
    as separate scalars so that autograd can differentiate it)."""
    T = T.double()
    n = T.shape[0]
    M = [[torch.exp(T[i, j]) for j in range(n)] for i in range(n)]
    for _ in range(num_iters):
        col_sums = [sum(M[i][j] for i in range(n)) for j in range(n)]
        M = [[M[i][j] / col_sums[j] for j in range(n)] for i in range(n)]
        row_sums = [sum(M[i]) for i in range(n)]
        M = [[M[i][j] / row_sums[i] for j in range(n)] for i in range(n)]
    return torch.stack([torch.stack(row) for row in M])


def _sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def _mhc_token(
    x: Tensor,
    n: int,
    branch: Branch,
    bias: Tensor,
    gates: Tensor | None,
    phi: Tensor | None,
    sinkhorn_iters: int,
    eps: float,
    h_res_parameterization: str,
) -> tuple[Tensor, Tensor, Tensor]:
    C = x.shape[0] // n
    X = [x[j * C : (j + 1) * C] for j in range(n)]
    P, width = bias.shape
    r = _rms(x, eps)  # RMS over all n*C values of the token

    H_pre = torch.zeros(n, dtype=torch.float64)
    H_post = torch.zeros(n, dtype=torch.float64)
    H_res = torch.zeros(n, n, dtype=torch.float64)
    for p in range(P):
        t = bias[p].clone()
        if phi is not None:
            a_pre, a_post, a_res = gates[p, 0], gates[p, 1], gates[p, 2]
            proj = x @ phi[:, p * width : (p + 1) * width]  # proposal p's columns
            for c in range(width):
                gate = a_pre if c < n else (a_post if c < 2 * n else a_res)
                t[c] = gate * proj[c] / r + bias[p, c]
        t_pre, t_post, t_res = t[:n], t[n : 2 * n], t[2 * n :]
        # Constrain each proposal, then average them.
        H_pre = H_pre + _sigmoid(t_pre) / P
        H_post = H_post + 2.0 * _sigmoid(t_post) / P
        if h_res_parameterization == "permutations":
            H_res = H_res + permutation_mixture(t_res, n) / P
        else:
            T_res = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(n):
                    T_res[i, j] = t_res[i * n + j]  # row-major
            H_res = H_res + sinkhorn(T_res, sinkhorn_iters) / P

    h0 = sum(H_pre[j] * X[j] for j in range(n))  # h0 = H_pre X
    y = branch(h0)
    # X' = H_res X + H_post^T y: row i = sum_j H_res[i, j] X_j + H_post[i] y.
    new_rows = [sum(H_res[i, j] * X[j] for j in range(n)) + H_post[i] * y for i in range(n)]
    return h0, torch.cat(new_rows), H_res


def mhc_sublayer(
    state: Tensor,
    num_streams: int,
    branch: Branch,
    bias: Tensor,
    gates: Tensor | None,
    phi: Tensor | None = None,
    sinkhorn_iters: int = 20,
    eps: float = 1e-5,
    h_res_parameterization: str = "sinkhorn",
) -> tuple[Tensor, Tensor, Tensor]:
    """mHC around ``branch``, per token, with P = bias.shape[0] proposals.

    Args:
        state: [..., n*C]. bias: [P, W] = [pre (n) | post (n) | res] per proposal, res being
            n*n logits (row-major) for "sinkhorn" and n! for "permutations" (mHC-lite).
        gates: [P, 3] = (a_pre, a_post, a_res). phi: [n*C, P*W], proposal p in columns
            p*W ... (p+1)*W - 1; None for the static variant (t = b).
        The parameters keep their autograd graph (cast to fp64): the outputs can be
        differentiated with respect to them.
    Returns:
        h0 [..., C], new state [..., n*C], H_res [..., n, n].
    """
    bias = bias.double()
    gates = None if gates is None else gates.double()
    phi = None if phi is None else phi.double()
    return _per_token(
        state,
        lambda x: _mhc_token(
            x, num_streams, branch, bias, gates, phi, sinkhorn_iters, eps, h_res_parameterization
        ),
    )


def permutation_mixture(u: Tensor, n: int) -> Tensor:
    """mHC-lite's H_res = sum_k softmax(u)_k P_k over the n! permutations perm_k (in
    itertools' order), P_k[i, perm_k(i)] = 1."""
    largest = max(float(v) for v in u)
    e = [torch.exp(u[k] - largest) for k in range(len(u))]
    total = sum(e)
    H = torch.zeros(n, n, dtype=torch.float64)
    for k, perm in enumerate(itertools.permutations(range(n))):
        for i in range(n):
            H[i, perm[i]] = H[i, perm[i]] + e[k] / total
    return H


# --------------------------------------------------------------------------------------------
# Section 6: stability metrics of one H_res [n, n] (destination-row convention).
# --------------------------------------------------------------------------------------------


def forward_gain(H: Tensor) -> float:
    """max_i sum_j |H[i, j]|: the largest absolute row sum."""
    n_rows, n_cols = H.shape
    return max(sum(abs(float(H[i, j])) for j in range(n_cols)) for i in range(n_rows))


def backward_gain(H: Tensor) -> float:
    """max_j sum_i |H[i, j]|: the largest absolute column sum."""
    n_rows, n_cols = H.shape
    return max(sum(abs(float(H[i, j])) for i in range(n_rows)) for j in range(n_cols))


def log_amax(H: Tensor) -> float:
    """log of the largest singular value: sqrt of the largest eigenvalue of H^T H."""
    H = H.double()
    return 0.5 * math.log(float(torch.linalg.eigvalsh(H.T @ H).max()))


def composite_gains(h_res_per_sublayer: list[Tensor]) -> list[tuple[float, float]]:
    """(forward, backward) gains of P_l = H[L-1] ... H[l] for every sublayer l."""
    gains = []
    product = torch.eye(h_res_per_sublayer[0].shape[0], dtype=torch.float64)
    for H in reversed(h_res_per_sublayer):
        product = product @ H.double()
        gains.append((forward_gain(product), backward_gain(product)))
    return gains[::-1]
