"""Safe, per-file image decoding and the deterministic views; the eval transform itself is the backbone's Preset."""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ..backbone import Preset

if TYPE_CHECKING:
    import torch

# Documented limits, checked from the header before any pixel is decoded (Pillow's globals stay untouched).
MAX_PIXELS = 64_000_000  # 64 MP: an 8000x8000 photo passes; a decompression bomb does not
MAX_FILE_BYTES = 256 * 2**20  # larger files are refused before they are read: memory stays bounded
MAX_ASPECT = 50.0  # longer side / shorter side; beyond this the 256-px resize would make a huge strip
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white

VIEWS = ("center", "flip")  # deterministic views per image; "flip" is the mirrored center crop
# "pil": Pillow decode + the preset on the CPU workers. "pil-draft": the same, but a JPEG at least twice the resize
# target is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (Image.draft), still >= the target, then
# resized: several times cheaper for big photos, slightly different pixels. "torchvision": JPEGs decoded by
# torchvision.io.decode_jpeg on the extraction device (nvJPEG on a GPU, batched) and resized there; other formats
# via Pillow. Each changes pixels (resampling rounding, DCT scaling), so the decoder is part of the recorded
# transform; "pil" is recorded as nothing at all, so caches made before the choice existed keep matching.


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


ORIENTATION = 0x0112  # the EXIF tag exif_transpose applies
JPEG_BYTES_PER_PIXEL = 3  # beyond the decoded RGB's own size, shipping the decoded pixels is cheaper
JPEG_SLACK = 2**20  # headers, ICC profiles and EXIF of small images
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker in entropy-coded data (not a stuffed 0xFF00
# or a restart marker), found at the last of any 0xFF fill bytes before it. A literal first byte lets the regex
# engine skip to each 0xFF (20x faster than a leading "\xff+": 50 us instead of 1 ms per 50 KB photo, per worker)


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
            pos = found.start()
    return None


def jpeg_payload(data: bytes) -> bytes | None:
    """The bytes to ship for torchvision's JPEG decoder: an RGB or grayscale JPEG within the limits (from the
    header only), with no EXIF rotation to apply, cut at its end-of-image marker and at most JPEG_BYTES_PER_PIXEL
    per pixel (+ JPEG_SLACK); None: decode with Pillow instead. Pillow's verdict and pixels are the reference:
    CMYK and anything unusual convert correctly there, a truncated file (no complete marker structure up to the
    end-of-image marker) is refused there with Pillow's reason (nvJPEG would return it partly grey, and cache it),
    a rotated photo is turned upright there (decode_jpeg on a GPU ignores EXIF orientation), a progressive JPEG
    is decoded in parallel there (nvJPEG's batched decode takes baseline JPEGs only; it decodes the others one by
    one in the main process), and bloated files are shipped as their decoded pixels."""
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
            if im.getexif().get(ORIENTATION, 1) != 1 or im.info.get("progressive"):
                return None  # progressive: nvJPEG decodes it alone, Huffman on the main process's CPU, one sync each
    except Exception:
        return None  # let Pillow's decode give the per-file reason
    end = jpeg_end(data)
    if end is None or end > JPEG_BYTES_PER_PIXEL * w * h + JPEG_SLACK:
        return None
    return data[:end]


def draft_size(w: int, h: int, short: int) -> tuple[int, int]:
    """The smallest size whose shorter side is still `short`, at the image's aspect ratio: what Image.draft may
    scale a JPEG down to (it picks the largest of 1/2, 1/4, 1/8 that stays at least this big) before a resize of
    the shorter side to `short`."""
    r = short / min(w, h)
    return max(1, math.ceil(w * r)), max(1, math.ceil(h * r))


def decode_rgb(data: bytes, draft: int = 0) -> Image.Image:
    """Bytes -> RGB PIL image, or DecodeError with a reason. Sniffs content (the extension is ignored).
    draft > 0: a JPEG whose shorter side is at least twice `draft` is decoded scaled down by 2, 4 or 8 in the DCT
    (libjpeg's draft mode), its shorter side still >= draft (decoder "pil-draft"); other images as they are."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_size(*im.size)
            im.seek(0)  # multi-frame (GIF, TIFF): the first frame
            if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
                im.draft("RGB", draft_size(*im.size, draft))  # rotation keeps the shorter side: before exif_transpose
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
    """[3, H, W] uint8 images (any sizes, on any device) -> [B, V, 3, S, S] float32 whose images are channels-last:
    the same preset, on tensors, batched. Images of one size are resized together (one resize per size, not per
    image); they stay uint8 (rounded, as Pillow's resize leaves them) until one normalisation of the whole batch.
    Nothing here waits for the device: no host sync, no blocking copy."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if any(v not in VIEWS for v in views):
        raise ValueError(f"unknown view in {views!r}")
    mode = InterpolationMode(preset.interpolation)
    s = preset.crop
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(k)
    crops = torch.empty((len(images), 3, s, s), dtype=torch.uint8, device=device)  # [B, 3, S, S]
    for ks in groups.values():
        x = torch.stack([images[k].to(device, non_blocking=True) for k in ks])  # [n, 3, H, W] uint8
        x = TF.center_crop(TF.resize(x, [preset.resize], interpolation=mode, antialias=True), [s])  # [n, 3, S, S]
        for lo, hi, at in _runs(ks):  # consecutive images: one copy each run (the whole batch when sizes agree)
            crops[lo:hi] = x[at:at + hi - lo]
    b, v = len(images), len(views)
    out = torch.empty_strided((b, v, 3, s, s), (v * 3 * s * s, 3 * s * s, 1, s * 3, 3),  # [B, V, 3, S, S],
                              device=device)  # each image channels-last, as the backbone runs
    for n, view in enumerate(views):
        out[:, n].copy_(crops.flip(-1) if view == "flip" else crops)  # uint8 -> float32, into channels-last
    mean, std = _norm(preset, device)
    return out.div_(255).sub_(mean).div_(std)  # as ImageClassification: x / 255, then (x - mean) / std


def _runs(ks: list[int]) -> list[tuple[int, int, int]]:
    """Sorted indices -> (lo, hi, offset in ks) of each run of consecutive values."""
    runs: list[tuple[int, int, int]] = []
    for at, k in enumerate(ks):
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1, runs[-1][2])
        else:
            runs.append((k, k + 1, at))
    return runs


_NORMS: dict[tuple[str, Preset], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm(preset: Preset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The preset's mean and std as [3, 1, 1] tensors on the device, made once: a copy to the device per batch
    would wait for the work queued before it."""
    import torch

    key = (str(device), preset)
    if key not in _NORMS:
        _NORMS[key] = (torch.tensor(preset.mean, device=device)[:, None, None],
                       torch.tensor(preset.std, device=device)[:, None, None])
    return _NORMS[key]
