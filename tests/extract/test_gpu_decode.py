"""Decoders (issue 17 items 2, 3, 7): the batched device decode (run here on the CPU through the same code), the
same verdicts on every decoder, Pillow's draft mode for big photos, and the JPEG end-of-image walk."""

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from catdog_cache.backbone import IMAGENET, Preset, WeightsSpec
from catdog_cache.cache import read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import ProvenanceMismatch
from catdog_cache.extract import loader as pipeline
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.plan import matching_flags
from catdog_cache.sources.decode import decode_rgb, decoder_of, jpeg_end, jpeg_payload, tensor_views
from tests.conftest import TINY


def cfg(decoder: str, device: str = "auto") -> ExtractConfig:
    return ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0, batch_size=4, decoder=decoder,
                         device=device)


@pytest.fixture
def decode_calls(monkeypatch):
    """Every list of JPEG byte strings handed to torchvision's decode_jpeg (the real one still decodes)."""
    import torchvision.io

    seen: list[list[bytes]] = []
    real = torchvision.io.decode_jpeg

    def recording(data, *a, **k):
        seen.append([bytes(t.numpy()) for t in data])
        return real(data, *a, **k)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", recording)
    return seen


def rotated_jpeg(path, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path, exif=exif)
    return path.read_bytes()


def test_truncated_jpeg_refused_alike_before_any_device_decode(tmp_path, kaggle_dir, decode_calls):
    """A truncated JPEG (no end-of-image marker): the torchvision decoder's worker sends it to Pillow, which refuses
    it; the failure record is the one the pil decoder writes, and decode_jpeg never sees the bytes (nvJPEG
    would return a partly grey image, cached as a row)."""
    whole = (kaggle_dir / "cat.1.jpg").read_bytes()
    (kaggle_dir / "cat.72.jpg").write_bytes(whole[:1500])
    (kaggle_dir / "cat.73.jpg").write_bytes(whole[:-2])  # everything but the end marker
    rotated = rotated_jpeg(kaggle_dir / "dog.74.jpg")  # EXIF rotation: Pillow turns it upright, nvJPEG would not
    assert jpeg_payload(whole[:1500]) is None and jpeg_payload(whole[:-2]) is None and jpeg_payload(rotated) is None
    extract(kaggle_dir, tmp_path / "pil.h5", cfg("pil"))
    extract(kaggle_dir, tmp_path / "tv.h5", cfg("torchvision"))
    a, b = read_index(tmp_path / "pil.h5"), read_index(tmp_path / "tv.h5")
    assert b.failed == a.failed and sorted(f[1] for f in a.failed) == [b"cat.72.jpg", b"cat.73.jpg"]
    assert all(f[3].startswith("corrupt or truncated image: image file is truncated") for f in b.failed)
    assert a.paths == b.paths and b"dog.74.jpg" in b.paths
    shipped = [d for call in decode_calls for d in call]
    assert len(shipped) == 12 and whole[:1500] not in shipped and whole[:-2] not in shipped
    assert rotated not in shipped and all(d.endswith(b"\xff\xd9") for d in shipped)
    fa, fb = read_features(tmp_path / "pil.h5"), read_features(tmp_path / "tv.h5")  # [N, D]
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    assert cos[b.paths.index(b"dog.74.jpg")] > 0.99  # turned upright by Pillow in the worker, as with pil


def test_device_decoder_refusal_gets_pillows_verdict(tmp_path, kaggle_dir, monkeypatch):
    """A JPEG that the device decoder refuses (a batch error, then one by one) is decoded by Pillow: same rows, no
    failure where Pillow has none."""
    import torchvision.io

    def refusing(data, *a, **k):
        raise RuntimeError("Error while decoding JPEG images: nvjpeg status 6")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing)
    extract(kaggle_dir, tmp_path / "tv.h5", cfg("torchvision", "cpu"))
    idx = read_index(tmp_path / "tv.h5")
    assert len(idx.paths) == 12 and idx.failed == []


def test_collate_ships_one_buffer_per_batch(kaggle_dir):
    """decoder="torchvision": a batch's JPEG bytes travel as one tensor (one shared-memory handle), sliced back
    without a copy; Pillow-decoded images keep their place."""
    files = pipeline.ImageFiles(kaggle_dir, ["cat.0.jpg", "cat.1.jpg", "dog.0.jpg"], ("center",), IMAGENET,
                                "torchvision")
    items = [files[0], files[1], (2, ("rgb", torch.zeros(3, 5, 7, dtype=torch.uint8)), "s", ""), files[2]]
    x, idx, _, failed = pipeline.collate(items)
    assert isinstance(x, pipeline.Encoded) and idx == [0, 1, 2, 2] and failed == []
    assert x.data.ndim == 1 and x.order == [(True, 0), (True, 1), (False, 0), (True, 2)]
    parts = x.jpegs()
    assert [bytes(p.numpy()) for p in parts] == [bytes(it[1][1].numpy()) for it in (items[0], items[1], items[3])]
    assert all(p.data_ptr() >= x.data.data_ptr() for p in parts)  # views of the buffer


def test_tensor_views_batched_by_size():
    """Mixed sizes, order kept: each image equals its own single-image result; channels-last float output."""
    g = torch.Generator().manual_seed(0)
    sizes = [(375, 500), (300, 400), (375, 500), (375, 500), (500, 375)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    x = tensor_views(imgs, ("center", "flip"), torch.device("cpu"), IMAGENET)  # [5, 2, 3, 224, 224]
    assert x.shape == (5, 2, 3, 224, 224) and x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    for k, img in enumerate(imgs):
        assert torch.equal(x[k], tensor_views([img], ("center", "flip"), torch.device("cpu"), IMAGENET)[0])
    ref = IMAGENET.transform()(Image.fromarray(imgs[1].permute(1, 2, 0).numpy()))  # Pillow resize: rounding only
    assert torch.equal(x[1, 1], x[1, 0].flip(-1)) and (x[1, 0] - ref).abs().mean() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nvJPEG and the device's resize")
def test_device_batch_on_cuda_no_host_sync(kaggle_dir):
    """On a GPU: nvJPEG decode of a batch, close to Pillow's; the batched preprocessing makes no host sync."""
    rels = [f"cat.{i}.jpg" for i in range(4)]
    files = pipeline.ImageFiles(kaggle_dir, rels, ("center",), IMAGENET, "torchvision")
    x, idx, shas, _ = pipeline.collate([files[i] for i in range(4)])
    dev = torch.device("cuda")
    out, idx, _, failed = pipeline.device_batch(x.pin_memory(), idx, shas, ("center",), dev, IMAGENET)
    ref = torch.stack([IMAGENET.transform()(decode_rgb((kaggle_dir / r).read_bytes())) for r in rels])
    assert failed == [] and (out[:, 0].cpu() - ref).abs().mean() < 0.05
    images = [img.to(dev) for img in pipeline.decode_jpegs(x.jpegs(), dev)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tensor_views(images, ("center", "flip"), dev, IMAGENET)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- --decoder pil-draft

def big_photo(w: int = 4000, h: int = 3000) -> bytes:
    """A 12 MP JPEG with a photo's detail (about 1.5 MB)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _best(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def test_draft_decodes_big_photos_smaller_and_faster():
    data = big_photo()
    assert decode_rgb(data).size == (4000, 3000)
    assert decode_rgb(data, 256).size == (500, 375)  # 1/8 in the DCT: the shorter side 375 >= 256
    assert decode_rgb(big_photo(600, 500), 256).size == (600, 500)  # less than twice the target: untouched
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the shorter side is the same, the draft is taken before turning it upright
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "JPEG", quality=90, exif=exif)
    assert decode_rgb(buf.getvalue(), 256).size == (375, 500)
    full, draft = _best(lambda: decode_rgb(data)), _best(lambda: decode_rgb(data, 256))
    assert full > 1.5 * draft, f"full {full:.3f} s, draft {draft:.3f} s"  # about 4x measured; a shared box's margin


def test_pil_draft_is_recorded_and_never_mixed(tmp_path, kaggle_dir, cli):
    """pil-draft is another transform in the provenance; small images decode exactly as with pil."""
    extract(kaggle_dir, tmp_path / "pil.h5", cfg("pil", "cpu"))  # on the CPU: bit-identical runs
    r = cli("extract", kaggle_dir, *TINY, "--cache", tmp_path / "draft.h5", "--decoder", "pil-draft", "--workers", "0",
            "--device", "cpu")
    assert r.exit_code == 0
    a, b = read_index(tmp_path / "pil.h5"), read_index(tmp_path / "draft.h5")
    assert decoder_of(b.provenance.transform) == "pil-draft" and decoder_of(a.provenance.transform) == "pil"
    assert Preset.from_spec(b.provenance.transform) == IMAGENET  # a head made from it loads
    assert "--decoder pil-draft" in matching_flags(b.provenance)
    assert np.array_equal(read_features(tmp_path / "pil.h5"), read_features(tmp_path / "draft.h5"))  # 96 px: no draft
    with pytest.raises(ProvenanceMismatch, match="decoder"):
        extract(kaggle_dir, tmp_path / "pil.h5", cfg("pil-draft", "cpu"))



def test_jpeg_end_walks_scans_restarts_and_fill_bytes():
    """The end-of-image marker found through progressive scans, restart markers and fill bytes; none without it."""
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    for kw in ({}, {"progressive": True}, {"restart_marker_blocks": 1}):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90, **kw)
        data = buf.getvalue()
        assert data.endswith(b"\xff\xd9") and jpeg_end(data) == len(data) == jpeg_end(data + b"junk" * 100)
        filled = data[:-2] + b"\xff\xff\xff\xd9"  # fill bytes before the end marker
        assert jpeg_end(filled) == len(filled)
        assert jpeg_end(data[:-2]) is None and jpeg_end(data[: len(data) // 2]) is None
    assert (b"\xff\xd0" in data) and jpeg_payload(data) == data  # restart markers really were written
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, progressive=True)
    assert jpeg_payload(buf.getvalue()) is None  # decoded by Pillow in the workers, not one by one on the device
