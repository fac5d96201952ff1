import pytest
import torch

from catdog_cache.head import Head, MaskStream


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_dropout_rate_and_scale_in_every_lane(p):
    m = MaskStream(0).scale(torch.Size((2000, 4096)), p)
    assert abs(m.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    for lane in range(8):  # each byte / 16-bit lane of the random words is uniform
        assert abs((m[:, lane::8] == 0).float().mean().item() - p) < 0.01
    values = torch.unique(m).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-3)


def test_dropout_only_in_training_and_reproducible():
    head = Head(0.5)
    x = torch.ones(4, 4096)
    head.eval()
    torch.testing.assert_close(head(x), head.linear(x))
    head.train()
    a = head(x, MaskStream(1))
    b = head(x, MaskStream(1))
    assert torch.equal(a, b) and not torch.equal(a, head.linear(x))
