"""bench --only tars: extract from a folder vs from tars, and the bytes an append writes."""

from __future__ import annotations


def test_bench_tars_rows(tmp_path, images):
    """bench --only tars: three inputs, same images, ratios to the folder; an append writes little of the cache."""
    from catdog_cache.bench import tars as benchtars

    folder = tmp_path / "kaggle"
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    rows = benchtars.tars_vs_folder(folder, lambda r: None, repeats=1)
    assert [r[0].split(" (")[0] for r in rows] == ["extract from folder", "extract from 1 tar", "extract from 4 tars"]
    assert rows[0][2].startswith("1.00x") and all(float(r[1].split()[0]) > 0 for r in rows)
    (what, written, note), = benchtars.append_bytes(lambda r: None, rows=2000, add=10, dim=256)
    cache_mib = float(note.split("the cache is ")[1].split()[0])
    assert "2,010 rows after" in note and float(written.split()[0]) < cache_mib / 20
