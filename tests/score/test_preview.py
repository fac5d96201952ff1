"""preview: the grid and its title, --worst without mistakes, the note on the head's own training folder."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from tests.conftest import TINY, draw, png_ok


def test_preview_grid_png(cli, trained, tmp_path):
    r = cli("preview", trained, "--out", "grid.png", "--n", "6")
    m = re.search(r"preview (\d+) images, (\d+) wrong", r.output)
    assert m and int(m.group(1)) <= 6  # validation images by default: the 12-image set holds fewer
    m = re.search(r"preview (\d+) images, (\d+) wrong", cli("preview", trained, "--out", "grid.png", "--n", "6",
                                                              "--split", "all").output)
    assert m and int(m.group(1)) == 6
    im = Image.open("grid.png")
    assert im.format == "PNG" and im.size[0] > 4 * 224 and im.size[1] > 2 * 224
    r = cli("preview", trained, "--n", "0", ok=False)
    assert r.exit_code == 1 and "--n" in r.output


def test_preview_grid_is_titled_with_the_head_and_backbone(cli, kaggle_dir, monkeypatch) -> None:
    from catdog_cache import plots

    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "2")
    titles = []
    real = plots.prediction_grid_figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        titles.append(" ".join(t.get_text() for t in fig.texts))
        return fig

    monkeypatch.setattr(plots, "prediction_grid_figure", spy)
    cli("preview", kaggle_dir, "--n", "4")
    assert len(titles) == 1
    title = titles[0].replace("\n", " ")
    assert "features.head.pt" in title and "Linear(4096, 2)" in title and "tiny fc7" in title
    assert png_ok(Path("cache/preview.png"))[0] > 200


def cats_only_head(cli, kaggle_dir, tmp_path) -> Path:
    """A head that calls everything a cat, and a labeled folder of cats only: no mistakes to show."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    head = Path("cache/features.head.pt")
    blob = torch.load(head, weights_only=True)
    blob["state_dict"]["linear.weight"].zero_()
    blob["state_dict"]["linear.bias"].copy_(torch.tensor([10.0, -10.0]))
    torch.save(blob, head)
    for i in range(3):
        draw(tmp_path / "cats" / f"cat.{i}.jpg", "cat", 700 + i)
    return tmp_path / "cats"


def test_preview_worst_without_mistakes_is_good_news(cli, kaggle_dir, tmp_path):
    cats = cats_only_head(cli, kaggle_dir, tmp_path)
    r = cli("preview", cats, "--worst", "4")
    assert "no mistakes among 3 images" in r.output and "error" not in r.output


def test_preview_note_only_on_the_heads_training_folder(cli, kaggle_dir, tmp_path):
    cats = cats_only_head(cli, kaggle_dir, tmp_path)
    r = cli("preview", cats)  # a new folder: every image is new, nothing to apologise for
    assert "no val images" not in r.output
    cli("fit", "--epochs", "1", "--val-fraction", "0", "--head", "all.head.pt")
    r = cli("preview", kaggle_dir, "--head", "all.head.pt")  # its training folder, with no validation split
    assert "no val images of the head's training here" in r.output
