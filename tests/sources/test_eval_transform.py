"""The preset's eval transform without torchvision (issue 33, item 4: a small extract no longer imports it) gives
torchvision's ImageClassification bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from catdog_cache.backbone import IMAGENET, Preset


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (300, 257), (100, 60), (224, 224), (231, 990)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_same_tensor_as_torchvision(size, interpolation):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    p = Preset(IMAGENET.resize, IMAGENET.crop, IMAGENET.mean, IMAGENET.std, interpolation)
    ref = ImageClassification(crop_size=p.crop, resize_size=p.resize, mean=p.mean, std=p.std,
                              interpolation=InterpolationMode(interpolation), antialias=True)(img)
    ours = p.transform()(img)
    assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == ref.dtype and torch.equal(ours, ref)


def imported_by_extract(data, cache, backbone: str) -> tuple[str, str]:
    """Which of torchvision, Ray and torch._dynamo a `--weights random` extract in a fresh process imported (a
    printed list), with its output for the assertion message."""
    import os
    import subprocess
    import sys

    code = ("import runpy, sys\nsys.argv = ['catdog-cache', 'extract', sys.argv[1], '--cache', sys.argv[2], "
            "'--backbone', sys.argv[3], '--weights', 'random', '-q']\ntry:\n    runpy.run_module('catdog_cache', "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torchvision', 'ray', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(data), str(cache), backbone], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=True)
    return out.stdout.strip().splitlines()[-1], out.stdout + out.stderr


def test_a_small_extract_imports_neither_torchvision_nor_ray(kaggle_dir, tmp_path):
    """Start-up (issue 33, item 4): a tiny extract in a fresh process; torchvision (which pulls in torch._dynamo)
    and Ray stay unimported."""
    imported, output = imported_by_extract(kaggle_dir, tmp_path / "c.h5", "tiny")
    assert imported == "[]", output
