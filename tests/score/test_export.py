"""export: the exported model predicts what predict does and loads in plain PyTorch."""

from __future__ import annotations

import numpy as np
import torch

from tests.conftest import rows


def test_export_equals_predict_and_loads_in_plain_pytorch(cli, trained, tmp_path):
    cli("export", "--out", "model.pt2")
    cli("predict", trained, "--model", "model.pt2", "--out", "a.csv")
    cli("predict", trained, "--out", "b.csv")
    a, b = rows("a.csv"), rows("b.csv")
    assert [r[0] for r in a] == [r[0] for r in b]
    np.testing.assert_allclose([float(r[2]) for r in a], [float(r[2]) for r in b], atol=1e-6)
    # the documented few lines of plain PyTorch
    from torchvision.models import VGG16_Weights

    from catdog_cache.sources.decode import decode_rgb

    model = torch.export.load("model.pt2").module()
    x = VGG16_Weights.IMAGENET1K_V1.transforms()(decode_rgb((trained / "cat.0.jpg").read_bytes()))[None]
    p = model(x)
    assert p.shape == (1, 2) and abs(p[0, 1].item() - float(dict((r[0], r[2]) for r in b)["cat.0.jpg"])) < 1e-5
    assert cli("export", "--out", "model.pt", ok=False).exit_code == 1
    r = cli("predict", trained, "--model", "missing.pt2", ok=False)
    assert r.exit_code == 1 and "missing.pt2" in r.output
