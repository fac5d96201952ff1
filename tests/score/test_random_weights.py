"""Features from random weights are said on every run that trains or scores on them (issue 31, item 3): they fit
and predicted ants vs bees at 0.588 without a word."""

from __future__ import annotations

import json

from catdog_cache.backbone import random_weights_note
from tests.conftest import TINY


def test_fit_predict_preview_and_info_say_the_features_are_random(cli, kaggle_dir, test_dir):
    cli("extract", kaggle_dir, *TINY)
    for args in (["fit", "--epochs", "1"], ["predict", test_dir, "--out", "p.csv"],
                 ["preview", kaggle_dir, "--out", "g.png"], ["info"]):
        r = cli(*args)
        assert "random weights (--weights random, seed 0)" in r.output, args
    assert json.loads(cli("info", "--json").output)["random_weights"] is True
    assert json.loads(cli("fit", "--epochs", "1", "--json").output)["random_weights"] is True
    r = json.loads(cli("predict", test_dir, "--out", "p.csv", "--json").output)  # said in the JSON, not beside it
    assert r["random_weights"] is True


def test_real_weights_get_no_note():
    assert random_weights_note(["imagenet", "file:sha256=ab,size=3"]) == ""
    assert "seed 7" in random_weights_note(["imagenet", "random:seed=7"])
