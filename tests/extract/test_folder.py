"""Extracting a folder: rows, reruns, failure records, appends, options, dtypes, precisions, decoders."""

import importlib
import json

import numpy as np
import pytest

from catdog_cache.backbone import WeightsSpec
from catdog_cache.cache import read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import ProvenanceMismatch
from catdog_cache.extract.config import ExtractConfig
from tests.conftest import TINY, draw

extract_mod = importlib.import_module("catdog_cache.extract.folder")  # the folder runner: run_features as it calls it
CFG = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0, batch_size=4)


@pytest.fixture
def forward_count(monkeypatch):
    """Count images that go through the backbone."""
    seen = []
    real = extract_mod.run_features

    def counting(root, rels, cfg, model=None, progress=None):
        seen.extend(rels)
        yield from real(root, rels, cfg, model, progress)

    monkeypatch.setattr(extract_mod, "run_features", counting)
    return seen


def test_extract_cli_kaggle(cli, kaggle_dir):
    r = cli("extract", kaggle_dir, *TINY)
    assert "extracted 12 new" in r.output
    idx = read_index("cache/features.h5")
    assert [p.decode() for p in idx.paths] == sorted(f"{k}.{i}.jpg" for k in ("cat", "dog") for i in range(6))
    assert idx.labels.tolist() == [0] * 6 + [1] * 6
    assert idx.shape == (12, 1, 4096)
    assert all(len(s) == 64 for s in idx.sha256)
    prov = idx.provenance
    assert (prov.arch, prov.weights, prov.layer, prov.dtype) == ("tiny", "random:seed=0", "fc7", "float32")


def test_rows_match_a_direct_forward_pass(tmp_path, folder_dir):
    """Row i is the backbone output of file i: no shuffling, no misalignment."""
    from dataclasses import replace

    from catdog_cache.backbone import build
    from catdog_cache.sources.decode import decode_rgb

    extract(folder_dir, tmp_path / "c.h5", replace(CFG, device="cpu"))  # compared with a CPU forward below
    idx = read_index(tmp_path / "c.h5")
    feats = read_features(tmp_path / "c.h5")
    model, t = build(CFG.weights, "tiny"), CFG.resolve().preset.transform()
    for i in (0, 3, 9):
        x = t(decode_rgb((folder_dir / idx.paths[i].decode()).read_bytes()))[None]
        np.testing.assert_allclose(model(x)[0].numpy(), feats[i], atol=1e-6)


def test_rerun_does_no_work_and_adds_only_new(tmp_path, kaggle_dir, forward_count):
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    assert len(forward_count) == 12
    r = extract(kaggle_dir, cache, CFG)
    assert len(forward_count) == 12 and r.extracted == 0 and r.reused == 12
    draw(kaggle_dir / "cat.99.jpg", "cat", 99)
    draw(kaggle_dir / "dog.0.jpg", "cat", 12345)  # changed content, same name
    extract(kaggle_dir, cache, CFG)
    assert forward_count[12:] == ["cat.99.jpg", "dog.0.jpg"]
    assert read_index(cache).shape[0] == 13


def test_deleted_files_reported_then_pruned(tmp_path, kaggle_dir):
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    (kaggle_dir / "cat.1.jpg").unlink()
    r = extract(kaggle_dir, cache, CFG)
    assert r.removed == ["cat.1.jpg"] and read_index(cache).shape[0] == 12
    r = extract(kaggle_dir, cache, CFG, prune=True)
    assert read_index(cache).shape[0] == 11 and b"cat.1.jpg" not in read_index(cache).paths


def test_bad_files_recorded_and_run_continues(cli, kaggle_dir):
    (kaggle_dir / "cat.50.jpg").write_bytes(b"not an image at all")
    (kaggle_dir / "dog.51.jpg").write_bytes((kaggle_dir / "dog.1.jpg").read_bytes()[:200])
    r = cli("extract", kaggle_dir, *TINY)
    assert r.exit_code == 0 and "2 files could not be decoded" in r.output
    idx = read_index("cache/features.h5")
    assert idx.shape[0] == 12
    assert {p.decode(): reason for _, p, _, reason in idx.failed}.keys() == {"cat.50.jpg", "dog.51.jpg"}
    r = cli("extract", kaggle_dir, *TINY, "--strict", "--cache", "strict.h5", ok=False)
    assert r.exit_code == 1 and "--strict" in r.output


def test_nothing_decodable_leaves_no_cache(cli, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cat.1.jpg").write_bytes(b"nope")
    r = cli("extract", tmp_path / "bad", *TINY, ok=False)
    assert r.exit_code == 1 and "could be decoded" in r.output
    assert not (tmp_path / "cache" / "features.h5").exists()


def test_append_second_folder_and_refuse_other_provenance(cli, kaggle_dir, folder_dir):
    cli("extract", kaggle_dir, *TINY)
    cli("extract", folder_dir, *TINY)
    idx = read_index("cache/features.h5")
    assert idx.shape[0] == 22 and len(idx.sources) == 2
    r = cli("extract", folder_dir, "--backbone", "tiny", "--weights", "random", "--seed", "1", ok=False)
    assert r.exit_code == 1 and "random:seed=0" in r.output and "random:seed=1" in r.output
    with pytest.raises(ProvenanceMismatch):
        extract(folder_dir, "cache/features.h5", ExtractConfig(weights=WeightsSpec("random"), backbone="tiny",
                                                              dtype="float16"))


@pytest.mark.parametrize("args,msg", [
    (["--batch-size", "-1"], "--batch-size"),
    (["--dtype", "int8"], "--dtype"),
    (["--weights", "nope.pth"], "nope.pth"),
    (["--device", "tpu"], "--device"),
    (["--views", "zoom"], "--views"),
])
def test_bad_options_one_line(cli, kaggle_dir, args, msg):
    r = cli("extract", kaggle_dir, "--backbone", "tiny", *(["--weights", "random"] if "--weights" not in args else []),
            *args, ok=False)
    assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output


def test_empty_and_missing_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    for target, msg in [(tmp_path / "empty", "no images found"), (tmp_path / "missing", "folder not found")]:
        r = cli("extract", target, *TINY, ok=False)
        assert r.exit_code == 1 and msg in r.output
    assert not (tmp_path / "cache" / "features.h5").exists()


def test_float16_and_views(tmp_path, kaggle_dir):
    cfg = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0, dtype="float16",
                        views=("center", "flip"))
    extract(kaggle_dir, tmp_path / "c.h5", cfg)
    idx = read_index(tmp_path / "c.h5")
    assert idx.shape == (12, 2, 4096) and idx.dtype == "float16"
    both = read_features(tmp_path / "c.h5", view=None)
    assert not np.allclose(both[:, 0], both[:, 1])


def test_workers_give_same_rows(tmp_path, kaggle_dir, monkeypatch):
    monkeypatch.setenv("CATDOG_EXTRACT_THREADS", "1")  # the forward's threads follow the workers unless pinned
    extract(kaggle_dir, tmp_path / "a.h5", CFG)
    extract(kaggle_dir, tmp_path / "b.h5", ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=2,
                                                              batch_size=4))  # same batches: only the workers differ
    np.testing.assert_array_equal(read_features(tmp_path / "a.h5"), read_features(tmp_path / "b.h5"))


def test_real_vgg16_structure_end_to_end(tmp_path, kaggle_dir):
    """The real frozen VGG16 (random weights): fc7 after ReLU, 4096-d, equal to torchvision's own classifier[:6]."""
    import torch
    from torchvision.models import vgg16

    from catdog_cache.backbone import build

    model = build(WeightsSpec("random", seed=3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = vgg16().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref.classifier[:6](torch.flatten(ref.avgpool(ref.features(x)), 1))
        got = model(x)
    assert got.shape == (2, 4096) and (got >= 0).all()
    torch.testing.assert_close(got, want)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_bf16_precision_on_cpu_is_recorded_and_close(tmp_path, kaggle_dir, cli):
    """Reduced precision runs on the CPU too (autocast), is recorded in provenance, and verify reports its
    deviation instead of claiming identity."""
    extract(kaggle_dir, tmp_path / "fp32.h5", CFG)
    bf16 = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0, precision="bf16")
    extract(kaggle_dir, tmp_path / "bf16.h5", bf16)
    assert read_index(tmp_path / "bf16.h5").provenance.precision == "bf16"
    a, b = read_features(tmp_path / "fp32.h5"), read_features(tmp_path / "bf16.h5")
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.05 * np.abs(a).max()
    r = cli("verify", kaggle_dir, *TINY, "--epochs", "1", "--precision", "bf16")
    assert r.exit_code == 0 and "measured deviation" in r.output
    r = cli("extract", kaggle_dir, *TINY, "--precision", "int4", ok=False)
    assert r.exit_code == 1 and "--precision" in r.output


def test_torchvision_decoder_matches_pil_closely_and_is_recorded(tmp_path, kaggle_dir, cli):
    """The device-decode path (run here on the CPU): same preset on tensors, recorded as another transform,
    per-file failures kept, non-JPEGs through Pillow."""
    from PIL import Image

    Image.new("RGB", (40, 40), (0, 128, 255)).convert("CMYK").save(kaggle_dir / "dog.70.jpg")  # via Pillow
    Image.new("RGB", (50, 30), (9, 9, 9)).save(kaggle_dir / "dog.71.png")  # not a JPEG
    (kaggle_dir / "cat.72.jpg").write_bytes((kaggle_dir / "cat.1.jpg").read_bytes()[:1500])  # truncated JPEG
    extract(kaggle_dir, tmp_path / "pil.h5", CFG)
    tv = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0, batch_size=4, decoder="torchvision")
    extract(kaggle_dir, tmp_path / "tv.h5", tv)
    a_idx, b_idx = read_index(tmp_path / "pil.h5"), read_index(tmp_path / "tv.h5")
    assert a_idx.paths == b_idx.paths and len(a_idx.paths) == 14
    assert '"decoder": "torchvision"' in b_idx.provenance.transform and "decoder" not in a_idx.provenance.transform
    assert [f[1] for f in b_idx.failed] == [b"cat.72.jpg"] and b_idx.failed == a_idx.failed  # Pillow's verdict
    a, b = read_features(tmp_path / "pil.h5"), read_features(tmp_path / "tv.h5")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98  # resampling rounding differs; the images do not
    r = cli("extract", kaggle_dir, *TINY, "--cache", tmp_path / "pil.h5", "--decoder", "torchvision", ok=False)
    assert r.exit_code == 1 and "decoder" in r.output  # never mixed into a cache made with Pillow
    cli("fit", "--cache", tmp_path / "tv.h5", "--head", tmp_path / "tv.pt", "--epochs", "1")
    r = cli("predict", kaggle_dir, "--head", tmp_path / "tv.pt", "--out", tmp_path / "tv.csv", "--json")
    assert json.loads(r.output)["rows"] == 14  # predict rebuilds the same decoder from the head
