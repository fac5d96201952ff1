"""fit/head.py's dropout: its rate and scale, only in training, the same masks on every device."""

import pytest
import torch

from catdog_cache.fit.head import Head, MaskStream


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


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_device_masks_are_the_host_masks(device, monkeypatch):
    """fit --device cuda unpacks the dropout words on the device: the same numbers as the host's numpy masks, for
    every mask kind (bits for p = 0.5, bytes for p on the 1/256 grid, 16-bit values otherwise), for widths that are
    not whole words, and across the boundary of an uploaded block."""
    from catdog_cache.fit.head import DeviceMaskStream

    monkeypatch.setattr(DeviceMaskStream, "BLOCK_WORDS", 50)  # several refills, one mid-request
    host, dev = MaskStream(3), DeviceMaskStream(3, torch.device(device))
    for shape, p in [((3, 100), 0.5), ((5, 4096), 0.5), ((2, 70), 0.25), ((4, 33), 0.3), ((7, 129), 0.5),
                     ((1, 4096), 0.1), ((3, 100), 0.5)]:
        size = torch.Size(shape)
        want = host.keep_bits(size) if p == 0.5 else host.scale(size, p)
        got = dev.keep_bits(size) if p == 0.5 else dev.scale(size, p)
        assert got.device.type == device and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want), (shape, p)
