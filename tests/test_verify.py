import pytest

from catdog_cache.backbone import WeightsSpec
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.fit import FitConfig
from catdog_cache.verify import balanced_subset, verify
from tests.conftest import SHARED_DATA, TINY

NO_PHOTOS = "sample photos absent: set CATDOG_SAMPLE_DATA or put ../shared/data/dogs-vs-cats beside the clone"

ECFG = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0)


def test_cached_and_end_to_end_agree(kaggle_dir):
    r = verify(kaggle_dir, ECFG, FitConfig(epochs=2, batch_size=4))
    assert r.identity_expected and r.agree
    assert r.max_prob_diff <= 1e-5 and r.max_weight_diff <= 1e-5 and r.differing_labels == 0
    assert r.max_streamed_diff == 0  # any memory budget, the same head
    assert r.n_images == 12 and r.n_val >= 2


def test_different_setting_is_reported_as_disagreement(cli, kaggle_dir):
    r = cli("verify", kaggle_dir, *TINY, "--epochs", "2", "--batch-size", "4", "--e2e-seed", "5", ok=False)
    assert r.exit_code == 1 and "disagree" in r.output


def test_verify_cli_agrees(cli, kaggle_dir):
    r = cli("verify", kaggle_dir, *TINY, "--epochs", "2", "--batch-size", "4")
    assert "agree within" in r.output and "speedup" in r.output


def test_float16_reports_deviation_not_identity(cli, kaggle_dir):
    r = cli("verify", kaggle_dir, *TINY, "--epochs", "2", "--dtype", "float16")
    assert r.exit_code == 0 and "measured deviation" in r.output and "agree within" not in r.output


def test_balanced_subset(kaggle_dir):
    rels = balanced_subset(kaggle_dir, 6)
    assert len(rels) == 6 and sum(r.startswith("cat") for r in rels) == 3


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "train").is_dir(), reason=NO_PHOTOS)
def test_real_photos_verify_and_pipeline(cli, tmp_path):
    """Real JPEGs from the shared sample: verify agrees, and extract -> fit -> predict runs on them."""
    r = cli("verify", SHARED_DATA / "train", *TINY, "--limit", "24", "--epochs", "2")
    assert "agree within" in r.output
    sub = tmp_path / "sub"
    sub.mkdir()
    for name in sorted(p.name for p in (SHARED_DATA / "test1").iterdir())[:6]:
        (sub / name).symlink_to(SHARED_DATA / "test1" / name)
    from catdog_cache.verify import balanced_subset as pick

    train = tmp_path / "train"
    train.mkdir()
    for rel in pick(SHARED_DATA / "train", 16):
        (train / rel).symlink_to(SHARED_DATA / "train" / rel)
    cli("extract", train, *TINY)
    cli("fit", "--epochs", "2")
    r = cli("predict", sub, "--submission", "sub.csv")
    assert "predicted 6 images" in r.output


def test_mlp_head_and_non_vgg_backbone_verify_identically(cli, kaggle_dir):
    """An MLP head (hidden layer + dropout masks from the shared stream) on a real torchvision backbone: training
    on the cache is bit-for-bit training through the network."""
    r = cli("verify", kaggle_dir, "--backbone", "mobilenet_v3_small", "--weights", "random", "--hidden", "16",
            "--epochs", "2", "--batch-size", "4", "--tolerance", "0")
    assert "agree within 0" in r.output and "0 differ" in r.output


def test_verify_on_an_unlabeled_folder_says_so(cli, test_dir):
    r = cli("verify", test_dir, *TINY, ok=False)
    assert r.exit_code == 1 and "4 images but no labels" in r.output


def _shared_subset(tmp_path, per_class: int, offset: int = 0):
    """Links to per_class cats and dogs of the shared photos (Kaggle names keep their labels)."""
    root = tmp_path / "real"
    root.mkdir()
    for kind in ("cat", "dog"):
        for i in range(offset, offset + per_class):
            (root / f"{kind}.{i}.jpg").symlink_to(SHARED_DATA / "train" / f"{kind}.{i}.jpg")
    return root


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "train").is_dir(), reason=NO_PHOTOS)
def test_real_imagenet_features_make_a_real_classifier(cli, tmp_path):
    """EfficientNet-Lite0 with its packaged ImageNet weights on 300 real photos: a linear head on the cached
    features reaches >= 0.97 validation accuracy. The same features with shuffled labels must not (the test can
    fail: wrong features or misaligned labels give chance level)."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the [lite] extra is not installed")
    import json

    import h5py
    import numpy as np

    root = _shared_subset(tmp_path, 150)
    cli("extract", root, "--backbone", "efficientnet_lite0", "--quiet")
    r = json.loads(cli("fit", "--json").output)
    assert r["val_acc"] >= 0.97 and r["val_log_loss"] < 0.15 and r["n_val"] >= 40
    with h5py.File("cache/features.h5", "r+") as f:  # the negative control: labels no longer match the images
        f["labels"][...] = np.random.default_rng(0).permutation(f["labels"][...])
    r = json.loads(cli("fit", "--json", "--head", "shuffled.pt").output)
    assert r["val_acc"] < 0.8
