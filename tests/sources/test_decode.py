"""sources/decode.py: the VGG16 preset, conversion to RGB, EXIF, sniffing, images refused unread."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from catdog_cache.backbone import get_backbone
from catdog_cache.sources.decode import DecodeError, decode_rgb, views_of


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_transform_is_the_vgg16_eval_preset():
    from torchvision.models import VGG16_Weights

    preset = get_backbone("vgg16").preset
    t = preset.transform()
    ref = VGG16_Weights.IMAGENET1K_V1.transforms()
    spec = json.loads(preset.spec())
    assert ([preset.resize], [preset.crop], list(preset.mean), list(preset.std)) == (
        ref.resize_size, ref.crop_size, ref.mean, ref.std)
    photo = Image.effect_noise((500, 300), 64).convert("RGB")
    assert torch.equal(t(photo), ref(photo))  # torchvision's preset, computed without importing torchvision
    assert spec["resize"] == 256 and spec["crop"] == 224 and spec["mean"] == list(ref.mean)
    # the exact spec string schema-1 caches recorded: old VGG16 caches stay valid
    assert preset.spec() == ('{"antialias": true, "crop": 224, "interpolation": "bilinear", "mean": [0.485, 0.456, '
                             '0.406], "resize": 256, "std": [0.229, 0.224, 0.225]}')
    x = views_of(Image.new("RGB", (500, 300), (10, 20, 30)), ("center", "flip"), t)
    assert tuple(x.shape) == (2, 3, 224, 224)


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGBA", "PNG"), ("LA", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "GIF"), ("1", "PNG"), ("I;16", "PNG")],
)
def test_modes_convert_to_rgb(mode, fmt):
    im = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((30, 40), 60000, np.uint16))
    out = decode_rgb(encode(im, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":
        assert out.getpixel((0, 0))[0] > 200  # 16-bit white stays white, not clipped garbage


def test_alpha_composited_on_white():
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert decode_rgb(encode(im, "PNG")).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_applied():
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    assert decode_rgb(encode(im, "JPEG", exif=exif)).size == (20, 60)


def test_png_named_jpg_is_sniffed():
    assert decode_rgb(encode(Image.new("RGB", (8, 8)), "PNG")).size == (8, 8)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is text, not a jpeg", "not an image"),
        (encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:300], "truncated"),
    ],
)
def test_bad_bytes_give_reasons(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_rgb(data)


def test_huge_declared_size_refused_before_decoding():
    # A PNG header declaring 100000 x 100000 pixels with almost no data: refused from the header.
    png = encode(Image.new("L", (1, 1)), "PNG")
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]
    with pytest.raises(DecodeError, match="MP limit|bomb"):
        decode_rgb(bomb)


def test_extreme_aspect_refused():
    with pytest.raises(DecodeError, match="aspect"):
        decode_rgb(encode(Image.new("RGB", (5000, 10)), "PNG"))


def test_multiframe_takes_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_rgb(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50
