"""Hardening, round 3: exports whose zip readers disagree, heads that lie about their tensors, shapes, transforms
and config, and image files that cost far more memory than their pixels. Every hostile file is built here (exports and
heads from the real ones of test_crafted_files)."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from tests.hostile import test_crafted_files as tu

base = tu.base  # the real cache, head and export (module-scoped), shared as this module's fixture too


def duplicate(src: Path, dst: Path, rel: str, first: bytes, change: dict | None = None) -> None:
    """A copy of src where member `rel` appears twice: `first` (crafted) before the genuine bytes. Python's zipfile
    reads the last of the two; torch's reader may read the first. `change` replaces other members' bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Duplicate name")
        for info in zin.infolist():
            data, name = zin.read(info.filename), info.filename.split("/", 1)[1]
            if name == rel:
                zout.writestr(info.filename, first)
            zout.writestr(info.filename, (change or {}).get(name, data))
    with zipfile.ZipFile(dst) as z:  # the crafted file really carries the member twice, genuine bytes last
        names = [n for n in z.namelist() if n.endswith("/" + rel)]
        assert len(names) == 2 and z.read(names[0]) != first


def _weights_config(src: Path) -> bytes:
    with zipfile.ZipFile(src) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("model_weights_config.json")))


@pytest.mark.parametrize("member", ["data/sample_inputs/model.pt", "data/weights/model_weights_config.json"])
def test_duplicate_member_export_never_unpickles(cli, base, tmp_path, member):
    marker, evil = tmp_path / "PWNED", tmp_path / "evil.pt2"
    if member.endswith("model.pt"):
        duplicate(base.model, evil, member, tu.evil_bytes(marker))
    else:  # the first config marks weight_0 as pickled; weight_0 then holds the payload
        genuine = _weights_config(base.model)
        pickled = genuine.replace(b'"path_name": "weight_0", "is_param": true, "use_pickle": false',
                                  b'"path_name": "weight_0", "is_param": true, "use_pickle": true', 1)
        assert pickled != genuine
        duplicate(base.model, evil, member, pickled, change={"data/weights/weight_0": tu.evil_bytes(marker)})
    r = cli("predict", base.test, "--model", evil, ok=False)
    assert not marker.exists()  # today's code: the payload ran
    tu.refused(r, "appears twice")
    assert not Path("cache/predictions.csv").exists()


def _rename_in_local_header(src: Path, dst: Path, rel: str, new: str) -> None:
    """The central directory keeps the name; the member's local header says another (same length)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(m for m in z.infolist() if m.filename.endswith("/" + rel))
    name = info.filename.encode()
    at = info.header_offset + 30
    assert data[at:at + len(name)] == name and len(new) == len(rel)
    data[at:at + len(name)] = name[:-len(rel)] + new.encode()
    dst.write_bytes(bytes(data))


def test_local_header_naming_another_member_is_refused(cli, base, tmp_path):
    evil = tmp_path / "evil.pt2"
    _rename_in_local_header(base.model, evil, "byteorder", "byteordeX")
    tu.refused(cli("predict", base.test, "--model", evil, ok=False), "local header")


def test_head_with_a_duplicate_member_is_refused(cli, base, tmp_path):
    with zipfile.ZipFile(base.head) as z:
        rel = next(n for n in z.namelist() if n.endswith("/data.pkl")).split("/", 1)[1]
    duplicate(base.head, tmp_path / "dup.pt", rel, b"not a pickle")
    tu.refused(cli("predict", base.test, "--head", tmp_path / "dup.pt", ok=False), "appears twice")


# ---------------------------------------------------------------- heads that lie about their tensors

def _expanded(blob: dict, hidden: int = 65536) -> None:
    """65,536 hidden units, every tensor a stride-0 view of one float: a few hundred bytes on disk, GBs in use."""
    import torch

    d = blob["in_dim"]
    one = torch.zeros(1)
    blob["hidden"] = [hidden]
    blob["state_dict"] = {"hidden.0.weight": one.expand(hidden, d), "hidden.0.bias": one.expand(hidden),
                          "linear.weight": one.expand(2, hidden), "linear.bias": torch.zeros(2)}


def test_head_of_stride_zero_views_is_refused(cli, base, tmp_path):
    head = tu.crafted_head(base, tmp_path / "expanded.pt", _expanded)
    assert head.stat().st_size < 2**20
    tu.refused(cli("predict", base.test, "--head", head, ok=False), "views into shared or smaller storage")
    assert not Path("cache/predictions.csv").exists()


def _narrower(blob: dict) -> None:
    """A consistent head of 4095 inputs (weights and in_dim agree) on 4096-d provenance."""
    blob["in_dim"] = 4095
    blob["state_dict"]["linear.weight"] = blob["state_dict"]["linear.weight"][:, :4095].clone()


def _two_members(blob: dict) -> None:
    """An ensemble of two 4096-d backbones declared on a head of 4096 inputs."""
    blob["ensemble"] = [blob["provenance"], blob["provenance"]]


@pytest.mark.parametrize("change", [_narrower, _two_members], ids=["in_dim", "ensemble"])
def test_head_size_disagreeing_with_its_provenance_is_one_line(cli, base, tmp_path, change):
    head = tu.crafted_head(base, tmp_path / "crafted.pt", change)
    tu.refused(cli("predict", base.test, "--head", head, ok=False), "but its provenance made")
    assert not Path("cache/predictions.csv").exists()
    if change is _narrower:  # export builds the backbone: checked against its description before tracing
        tu.refused(cli("export", "--head", head, "--out", tmp_path / "m.pt2", ok=False), "but its provenance (")
        assert not (tmp_path / "m.pt2").exists()


def test_cache_narrower_than_the_head_is_one_line(cli, base, tmp_path):
    """A cache whose provenance matches the head but whose rows are 4095 wide: checked before the matmul."""
    import h5py

    tu.install(base, head=False)
    src = tmp_path / "src.h5"
    Path("cache/features.h5").rename(src)

    def narrow(g, ds):
        n, v = ds.shape[:2]  # whole-row chunks as the writer makes them: only the width is crafted
        g.create_dataset("features", data=ds[:, :, :4095], chunks=(min(64, n), v, 4095))

    tu.craft_cache(src, Path("cache/features.h5"), {"features": narrow})
    with h5py.File("cache/features.h5", "r") as f:
        assert f["features"].shape[-1] == 4095
    r = cli("predict", base.train, "--head", base.head, "--cache", "cache/features.h5", ok=False)
    tu.refused(r, "made 4095-d ones")
    assert not Path("cache/predictions.csv").exists()


# ---------------------------------------------------------------- an export's recorded transform and a head's config

def _transform(**changes):
    def change(data: bytes) -> bytes:
        info = json.loads(data)
        transform = json.loads(info["provenance"]["transform"])
        transform.update(changes)
        info["provenance"]["transform"] = json.dumps(transform)
        return json.dumps(info).encode()
    return change


@pytest.mark.parametrize("changes", [{"interpolation": "bogus"}, {"crop": 0}, {"resize": 1e6},
                                     {"resize": 1000000}, {"mean": [0.5, float("nan"), 0.5]}, {"std": [0, 1, 1]},
                                     {"decoder": "magic"}],
                         ids=["interpolation", "crop-0", "resize-1e6", "resize-10**6", "mean-nan", "std-0",
                              "decoder"])
def test_export_with_a_crafted_transform_is_one_line(cli, base, tmp_path, changes):
    evil = tmp_path / "evil.pt2"
    tu.rewrite_zip(base.model, evil, replace={"extra/catdog_cache.json": _transform(**changes)})
    r = cli("predict", base.test, "--model", evil, ok=False)
    tu.refused(r, "recorded transform is invalid")
    assert not Path("cache/predictions.csv").exists()


def test_export_whose_transform_disagrees_with_its_program_is_one_line(cli, base, tmp_path):
    """A valid preset, but not the crop the program was exported for: a guard traceback per batch today."""
    evil = tmp_path / "evil.pt2"
    tu.rewrite_zip(base.model, evil, replace={"extra/catdog_cache.json": _transform(crop=200)})
    tu.refused(cli("predict", base.test, "--model", evil, ok=False), "crops to 200 px")


@pytest.mark.parametrize(("config", "words"), [
    ({"seed": 2**70}, "seed"), ({"seed": float("inf")}, "seed"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"val_fraction": float("nan")}, "val_fraction"), ({"val_fraction": 7}, "val_fraction"), (None, "config"),
], ids=["seed-2**70", "seed-inf", "seed-neg", "seed-float", "val-nan", "val-7", "not-a-mapping"])
def test_head_with_a_crafted_config_is_one_line(cli, base, tmp_path, config, words):
    def change(blob):
        blob["cache"] = str(Path("cache/features.h5").resolve())  # preview replays the split on its own cache
        if config is None:
            blob["config"] = [1, 2]
        else:
            blob["config"].update(config)

    head = tu.crafted_head(base, tmp_path / "crafted.pt", change)
    tu.install(base, head=False)
    r = cli("preview", base.train, "--head", head, "--cache", "cache/features.h5", "--out", "grid.png", ok=False)
    tu.refused(r, words)
    assert not Path("grid.png").exists()


@pytest.mark.parametrize("p", ["0.9999924", "0.995"])
def test_fit_dropout_near_one_is_one_line(cli, base, p):
    """1 / (1 - p) on the masks' 1/65536 grid: 0.9999924 rounds to p = 1, a ZeroDivisionError today."""
    tu.install(base, head=False)
    tu.refused(cli("fit", "--dropout", p, *tu.FIT, ok=False), "--dropout")
    assert not Path("cache/features.head.pt").exists()


def test_head_with_dropout_near_one_is_refused(cli, base, tmp_path):
    head = tu.crafted_head(base, tmp_path / "crafted.pt", lambda b: b.update(dropout=0.9999924))
    tu.refused(cli("predict", base.test, "--head", head, ok=False), "dropout")


# ---------------------------------------------------------------- 16-bit and float images: bounded conversion

def _old_gray8(im: Image.Image) -> np.ndarray:
    """The conversion as it was (three whole-image float64 copies): the reference for the same pixels."""
    a = np.asarray(im, dtype=np.float64)
    scale = 257.0 if a.max(initial=0) > 255 else 1.0
    return np.clip(a / scale, 0, 255).astype(np.uint8)


def _wide_images() -> dict[str, tuple[Image.Image, str]]:
    rng = np.random.default_rng(5)
    u16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    u16[0, :6] = [0, 257, 514, 65535, 256, 65279]  # exact multiples of 257 and neighbours
    small = rng.integers(0, 256, (37, 53), dtype=np.uint16)  # a 16-bit file using 8-bit values: no scaling
    floats = (rng.standard_normal((37, 53)) * 30000).astype(np.float32)
    floats[0, :5] = [-1.5, 0.999, 255.999, 65535.0, 1e9]
    i32 = rng.integers(-70000, 70000, (37, 53), dtype=np.int32)
    return {"png16": (Image.fromarray(u16), "PNG"), "png16-small": (Image.fromarray(small), "PNG"),
            "tiff-float": (Image.fromarray(floats, "F"), "TIFF"), "tiff-int32": (Image.fromarray(i32, "I"), "TIFF"),
            "tiff-float-8bit": (Image.fromarray((floats % 256).astype(np.float32), "F"), "TIFF")}


@pytest.mark.parametrize("kind", list(_wide_images()))
def test_wide_images_convert_to_the_same_rgb(kind):
    from catdog_cache.sources.decode import BAND_PIXELS, decode_rgb

    im, fmt = _wide_images()[kind]
    buf = io.BytesIO()
    im.save(buf, fmt)
    with Image.open(io.BytesIO(buf.getvalue())) as src:
        src.load()
        want = _old_gray8(src)
    with mock.patch("catdog_cache.sources.decode.BAND_PIXELS", 200):  # several bands even on a small image
        got = np.asarray(decode_rgb(buf.getvalue()))  # [H, W, 3]
    assert BAND_PIXELS > 200 and got.shape == (*want.shape, 3)
    assert (got == want[..., None]).all()


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_wide_image_conversion_memory_is_bounded(mode):
    """4 MP: the old conversion peaked at about 26 bytes per pixel in numpy (three float64 copies); now the
    output byte plus one band."""
    import tracemalloc

    from catdog_cache.sources.decode import _to_rgb

    side = 2048
    a = np.arange(side * side, dtype=np.uint32).reshape(side, side) % 60000
    im = Image.fromarray(a.astype(np.uint16)) if mode == "I;16" else Image.fromarray(a.astype(np.float32), "F")
    assert im.mode == mode
    del a
    tracemalloc.start()
    try:
        out = _to_rgb(im)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.mode == "RGB" and out.size == (side, side)
    assert peak < 4 * side * side, f"{peak / side / side:.1f} bytes per pixel"


# ---------------------------------------------------------------- --decoder torchvision ships bounded JPEG bytes

def _shipped(folder: Path, name: str):
    """What a loader worker hands the main process for one file with --decoder torchvision."""
    from catdog_cache.backbone import IMAGENET
    from catdog_cache.extract.loader import ImageFiles

    _, item, _, reason = ImageFiles(folder, [name], ("center",), IMAGENET, "torchvision")[0]
    assert not reason, reason
    return item


def test_padded_jpeg_ships_only_the_image(tmp_path):
    clean = tu.draw(tmp_path / "cat.0.jpg", "cat", 1).read_bytes()
    (tmp_path / "cat.1.jpg").write_bytes(clean + b"\xff\xd9" + b"\0" * 2**20)  # 1 MiB after the end marker
    kind, data = _shipped(tmp_path, "cat.1.jpg")
    assert kind == "jpeg" and bytes(data.numpy()) == clean


def test_bloated_jpeg_ships_decoded_pixels(tmp_path):
    """Bytes that cannot be cut (a 60 KB comment inside the image) beyond the per-pixel bound: Pillow decodes it in
    the worker, so at most the pixels (3 bytes each) travel; the bound is patched down to fit a small image."""
    im = Image.open(tu.draw(tmp_path / "cat.0.jpg", "cat", 1)).convert("RGB")
    im.save(tmp_path / "cat.1.jpg", "JPEG", quality=90, comment=b"x" * 60000)
    assert (tmp_path / "cat.1.jpg").stat().st_size > 60000 > 3 * im.width * im.height
    with mock.patch("catdog_cache.sources.decode.JPEG_SLACK", 1024, create=True):
        kind, data = _shipped(tmp_path, "cat.1.jpg")
        assert _shipped(tmp_path, "cat.0.jpg")[0] == "jpeg"
    assert kind == "rgb" and tuple(data.shape) == (3, im.height, im.width)
