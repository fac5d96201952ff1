"""A linear head's training step on the host without autograd.

A Dropout -> Linear head's step is a handful of tiny ops around two passes over the batch, and autograd's graph,
engine and gradient accumulation cost about as much as the arithmetic. LinearStep calls the very ATen kernels that
`F.cross_entropy(head(x, masks), y).backward()` runs, in the same order, on tensors of the same layouts, so every
gradient (hence every weight) is the autograd step's bit for bit; tests/fit/test_fast_step.py keeps that loop as the
reference and compares the heads with torch.equal."""

from __future__ import annotations

import torch

from .head import Head, MaskStream
from .optim import Adam

MEAN, NO_IGNORE = 1, -100  # F.cross_entropy's defaults as ATen takes them: reduction "mean", ignore_index

nll_forward = torch.ops.aten.nll_loss_forward.default
nll_backward = torch.ops.aten.nll_loss_backward.default
log_softmax_backward = torch.ops.aten._log_softmax_backward_data.default


class LinearStep:
    """One Adam step of a linear head (no hidden layers) on a batch, in two halves: prepare (dropout, no parameter
    touched) and update, which returns the batch's mean cross-entropy (a 0-d tensor) and writes the predicted
    classes into `pred`."""

    def __init__(self, head: Head, opt: Adam) -> None:
        self.head, self.opt = head, opt
        self.one = torch.ones(())  # d loss / d loss, as backward() seeds it

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, masks: MaskStream) -> tuple[torch.Tensor, bool]:
        """The batch [B, D] as the classifier sees it after dropout, and whether the weight is doubled: touches no
        parameter, so it can run a step ahead (fit.ahead)."""
        return self.head.drop_linear(x, masks) if self.head.dropout > 0 else (x, False)

    @torch.no_grad()
    def update(self, x: torch.Tensor, double: bool, y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The step on a prepared batch x [B, D] with labels y [B]."""
        w, b = self.head.linear.weight, self.head.linear.bias  # [K, D], [K]
        # forward, as Head.forward: logits = (W or 2W) @ x^T, transposed, plus the bias (layouts matter to the
        # kernels below: the same expressions, not equivalent ones)
        logits = torch.mm(w * 2.0 if double else w, x.t()).t() + b  # [B, K]
        logp = torch.log_softmax(logits, 1)  # [B, K]; F.cross_entropy = log_softmax, then nll_loss
        loss, total = nll_forward(logp, y, None, MEAN, NO_IGNORE)
        # backward, node by node as autograd runs it: NllLoss, LogSoftmax, Add (the bias: sum_to its shape), T, Mm
        # (mm_mat1_backward for a row-major weight: grad @ mat2^T), Mul by 2 (the doubled weight)
        g = log_softmax_backward(nll_backward(self.one, logp, y, None, MEAN, NO_IGNORE, total), logp, 1,
                                 torch.float32)  # [B, K] d loss / d logits
        b.grad = g.sum(0, keepdim=True).view(b.shape)  # [K]
        gw = g.t().mm(x)  # [K, D]
        w.grad = gw.mul_(2.0) if double else gw
        self.opt.step()
        torch.argmax(logits, 1, out=pred)  # [B]
        return loss
