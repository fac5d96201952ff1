"""fit's autograd-free linear step (fit/step.py) gives the heads the autograd loop gave, bit for bit.

The reference below is the training pass as it was before the step existed: autograd through the head, the dropout
mask multiplied as a uint8 tensor, statistics summed step by step. Every fit here runs twice, once with the
reference patched in, and the heads (and the epoch statistics) must be equal with torch.equal."""

import pytest
import torch
import torch.nn.functional as F

from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit import loop as fit_loop
from catdog_cache.fit.batches import windowed_batches
from catdog_cache.fit.head import load_head
from tests.fit.test_fit import synthetic_cache


def reference_forward(head, x, masks):
    """Head.forward in training before the step existed (the linear head's dropout inline, uint8 mask)."""
    if head.hidden:
        return head(x, masks)
    w = head.linear.weight
    if head.dropout == 0.5:
        x = x.mul_(masks.keep_bits(x.shape))
        w = w * 2.0
    elif head.dropout > 0:
        x = masks.scale(x.shape, head.dropout).mul_(x)
    return torch.mm(w, x.t()).t() + head.linear.bias


def reference_pass(self):
    """Trainer's training pass before the step existed: autograd, zero_grad, backward, Adam, sums per step."""
    loss_sum, correct_t, n = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
    for rows in windowed_batches(self.train_rows, self.cfg.batch_size, self.g_order):
        x, y = self.features_of(rows), self.labels[rows]
        logits = reference_forward(self.head, x, self.masks)
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        loss_sum.add_(loss.detach(), alpha=len(rows))
        correct_t.add_((logits.detach().argmax(1) == y).sum())
        n += len(rows)
    return n, loss_sum, correct_t


def untimed(history):
    """The epoch statistics but their times, as text: NaN (no validation rows) equals NaN."""
    return repr([{k: v for k, v in h.row().items() if k != "seconds"} for h in history])


CASES = [
    ("default", FitConfig(epochs=3), {}),
    ("streamed", FitConfig(epochs=2), {"max_memory": "1M"}),
    ("folds", FitConfig(epochs=2), {"folds": 3}),
    ("folds streamed", FitConfig(epochs=2), {"folds": 3, "max_memory": "1M"}),
    ("dropout 0.3, weight decay", FitConfig(epochs=2, dropout=0.3, weight_decay=0.01), {}),
    ("no dropout, keep best", FitConfig(epochs=3, dropout=0.0, keep="best"), {}),
    ("odd batch", FitConfig(epochs=2, batch_size=37, lr=3e-3), {}),
    ("mlp", FitConfig(epochs=2, hidden=(32,)), {}),
    ("mlp streamed folds", FitConfig(epochs=2, hidden=(32,)), {"folds": 3, "max_memory": "1M"}),
]


@pytest.mark.parametrize("name,cfg,kw", CASES, ids=[c[0] for c in CASES])
def test_heads_bit_identical_to_the_autograd_loop(tmp_path, monkeypatch, name, cfg, kw):
    synthetic_cache(tmp_path / "c.h5", n=420)
    fast = fit(tmp_path / "c.h5", tmp_path / "fast.pt", cfg, curve=False, device="cpu", **kw)
    with monkeypatch.context() as m:
        m.setattr(fit_loop.Trainer, "host_linear_pass", reference_pass)
        m.setattr(fit_loop.Trainer, "autograd_pass", reference_pass)
        ref = fit(tmp_path / "c.h5", tmp_path / "ref.pt", cfg, curve=False, device="cpu", **kw)
    assert fast.streamed == ref.streamed == ("max_memory" in kw)
    a, b = load_head(tmp_path / "fast.pt")[0].state_dict(), load_head(tmp_path / "ref.pt")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(fast.history) == untimed(ref.history)
    assert repr((fast.val_log_loss, fast.confusion)) == repr((ref.val_log_loss, ref.confusion))


def test_linear_head_trains_without_autograd(tmp_path, monkeypatch):
    """The host's linear head never builds a graph (the old loop called loss.backward() every step); an MLP head
    still does."""
    synthetic_cache(tmp_path / "c.h5", n=200)
    calls = []
    real = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: (calls.append(1), real(*a, **k)))
    r = fit(tmp_path / "c.h5", tmp_path / "h.pt", FitConfig(epochs=2), curve=False, device="cpu")
    assert calls == [] and r.history[-1].train_acc > 0.5
    fit(tmp_path / "c.h5", tmp_path / "m.pt", FitConfig(epochs=1, hidden=(16,)), curve=False, device="cpu")
    assert calls
