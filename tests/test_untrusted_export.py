"""Hardening, round 3 (exports and heads): archives whose zip readers disagree, heads that lie about their tensors,
shapes, transforms and config. Every hostile file is built here from the real export and head of test_untrusted."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest

from tests import test_untrusted as tu

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
