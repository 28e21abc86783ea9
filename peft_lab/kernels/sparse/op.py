"""`sparse_linear`: one autograd Function over the sparse-delta linear (reference path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peft_lab.kernels.sparse import reference as ref

__all__ = ["sparse_linear"]


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rows, cols, values, bias):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)
        y = (y.to(ref.acc_dtype(y)) + ref.sparse_delta_matmul(x2, rows, cols, values, weight.shape[0])).to(y.dtype)
        ctx.save_for_backward(x2, weight, rows, cols, values)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rows, cols, values = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = dv = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight).to(ref.acc_dtype(dy2)) + ref.sparse_delta_matmul_t(dy2, rows, cols, values, weight.shape[1])
            dx = dx.to(x2.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = dy2.t() @ x2
        if ctx.needs_input_grad[4]:
            dv = ref.sddmm(dy2, x2, rows, cols).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            db = dy2.sum(0)
        return dx, dw, None, None, dv, db


def sparse_linear(x, weight, rows, cols, values, bias=None):
    """y = x·(W + S)^T + b; differentiable in x, values (and weight/bias when they require grad)."""
    return _SparseLinear.apply(x, weight, rows, cols, values, bias)
