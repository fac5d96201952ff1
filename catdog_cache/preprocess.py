"""Safe, per-file image decoding and the deterministic views; the eval transform itself is the backbone's Preset."""

from __future__ import annotations

import io
import json
import re
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

    from .backbone import Preset

# Documented limits, checked from the header before any pixel is decoded (Pillow's globals stay untouched).
MAX_PIXELS = 64_000_000  # 64 MP: an 8000x8000 photo passes; a decompression bomb does not
MAX_FILE_BYTES = 256 * 2**20  # larger files are refused before they are read: memory stays bounded
MAX_ASPECT = 50.0  # longer side / shorter side; beyond this the 256-px resize would make a huge strip
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white

VIEWS = ("center", "flip")  # deterministic views per image; "flip" is the mirrored center crop
# "pil": Pillow decode + the preset on the CPU workers. "torchvision": JPEGs decoded by torchvision.io.decode_jpeg on
# the extraction device (nvJPEG on a GPU, batched) and resized there; other formats via Pillow. The two differ by
# resampling rounding, so the decoder is part of the recorded transform.
DECODERS = ("pil", "torchvision")


class DecodeError(Exception):
    """One file could not be turned into an RGB image; the message is the per-file reason."""


def decoder_of(transform: str) -> str:
    return json.loads(transform).get("decoder", "pil")


def _check_size(w: int, h: int) -> None:
    if w < 1 or h < 1:
        raise DecodeError(f"invalid size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise DecodeError(f"{w}x{h} exceeds the {MAX_PIXELS // 1_000_000} MP limit")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise DecodeError(f"{w}x{h} aspect ratio exceeds {MAX_ASPECT:g}:1")


JPEG_BYTES_PER_PIXEL = 3  # beyond the decoded RGB's own size, shipping the decoded pixels is cheaper
JPEG_SLACK = 2**20  # headers, ICC profiles and EXIF of small images
_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")  # a marker in entropy-coded data (not a stuffed 0xFF00
# or a restart marker); any number of 0xFF fill bytes may precede it


def jpeg_end(data: bytes) -> int | None:
    """Offset just past the JPEG's end-of-image marker (bytes after it are not the image: a file padded to
    200 MiB would otherwise be shipped whole), or None if the marker structure is not a JPEG's."""
    pos = 2  # after SOI
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        if pos + 4 > len(data):
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")  # a segment with its length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            found = _MARKER.search(data, pos)
            if found is None:
                return None
            pos = found.start(1) - 1
    return None


def jpeg_payload(data: bytes) -> bytes | None:
    """The bytes to ship for torchvision's JPEG decoder: an RGB or grayscale JPEG within the limits (from the
    header only), cut at its end-of-image marker and at most JPEG_BYTES_PER_PIXEL per pixel (+ JPEG_SLACK);
    None: decode with Pillow instead (CMYK and anything unusual convert correctly there, and bloated files are
    shipped as their decoded pixels)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_size(*im.size)
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            w, h = im.size
    except Exception:
        return None  # let Pillow's decode give the per-file reason
    end = jpeg_end(data) or len(data)  # no end marker (truncated): torchvision's decoder gives the reason
    if end > JPEG_BYTES_PER_PIXEL * w * h + JPEG_SLACK:
        return None
    return data[:end]


def decode_rgb(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image, or DecodeError with a reason. Sniffs content (the extension is ignored)."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_size(*im.size)
            im.seek(0)  # multi-frame (GIF, TIFF): the first frame
            im.load()  # truncated data raises here (LOAD_TRUNCATED_IMAGES stays False: no grey padding)
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from None


BAND_PIXELS = 1 << 18  # 16- and 32-bit images are converted a band of rows at a time: 2 MB of float64 each


def _gray8(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit int or float grey -> 8-bit "L": values over 255 mean a 16-bit range (divided by 257), then
    clipped to [0, 255] and truncated. Band by band, so a 64 MP image costs 1 byte per pixel (the output) plus one
    band, not three float64 copies (24 bytes per pixel, 1.5 GB per worker)."""
    w, h = im.size
    step = max(1, BAND_PIXELS // max(w, 1))
    bands = [(0, y, w, min(y + step, h)) for y in range(0, h, step)]
    tops = [np.asarray(im.crop(b)).max(initial=0) for b in bands]
    scale = 257.0 if np.max(np.asarray(tops, np.float64), initial=0) > 255 else 1.0  # a NaN max: no scaling
    out = np.empty((h, w), np.uint8)  # [H, W]
    for x0, y0, x1, y1 in bands:
        band = np.asarray(im.crop((x0, y0, x1, y1)), dtype=np.float64)  # [rows, W], the values as they are
        band /= scale
        np.clip(band, 0, 255, out=band)
        out[y0:y1] = band  # truncates toward zero, as astype(np.uint8) did
    return Image.fromarray(out, "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = _gray8(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV...


def views_of(image: Image.Image, views: tuple[str, ...], transform) -> torch.Tensor:
    """RGB image -> [V, 3, 224, 224] normalised tensor, one slice per deterministic view."""
    return stack_views(transform(image), views)


def stack_views(x: torch.Tensor, views: tuple[str, ...]) -> torch.Tensor:
    """[3, 224, 224] -> [V, 3, 224, 224]: the center crop as is, "flip" mirrored left-right."""
    import torch

    if any(v not in VIEWS for v in views):
        raise ValueError(f"unknown view in {views!r}")
    return torch.stack([torch.flip(x, dims=[2]) if v == "flip" else x for v in views])


def tensor_views(images: list[torch.Tensor], views: tuple[str, ...], device: torch.device, preset: Preset
                 ) -> torch.Tensor:
    """[3, H, W] uint8 images (any sizes, on any device) -> [B, V, 3, S, S]: the same preset, on tensors."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    mean = torch.tensor(preset.mean, device=device)[:, None, None]
    std = torch.tensor(preset.std, device=device)[:, None, None]
    mode = InterpolationMode(preset.interpolation)
    out = []
    for img in images:
        x = TF.resize(img.to(device), [preset.resize], interpolation=mode, antialias=True)
        x = TF.center_crop(x, [preset.crop])  # [3, S, S] uint8
        out.append(stack_views((x.float() / 255 - mean) / std, views))  # [V, 3, S, S]
    return torch.stack(out)  # [B, V, 3, S, S]
