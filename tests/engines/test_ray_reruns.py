"""A Ray rerun decides a folder's files by the local engine's rule (hardening round 4, item 4): a file replaced by
a rename with its size and mtime put back has a new inode, and its unit is no longer done. Ray-free: the units'
work (folder_units.run_unit) and the driver's check (unit_done) are plain functions."""

from __future__ import annotations

import os
import time

from catdog_cache.extract.folder_units import cut_folder, run_unit, unit_done
from catdog_cache.extract.plan import known_files
from catdog_cache.sources.folder import discover
from tests.conftest import draw
from tests.engines.test_ray import CFG


def test_a_file_replaced_by_rename_makes_its_unit_undone(tmp_path):
    data = tmp_path / "data"
    old = time.time_ns() - 60 * 10**9  # older than the racy window: stats are trusted, as for any settled folder
    for i in range(2):
        for kind, seed in (("cat", i), ("dog", 100 + i)):
            path = draw(data / kind / f"{i}.jpg", kind, seed)
            os.utime(path, ns=(old, old))
    cache, prov = tmp_path / "c.h5", CFG.provenance()
    scan_ns = time.time_ns()
    disc = discover(data)
    source = str(disc.root.resolve())
    units = cut_folder(disc.root, disc.samples, source, prov, 2, disc.classes, disc.stat)
    for unit in units:
        run_unit(unit, disc.root, cache, CFG, prov, source, "run", known_files(cache, prov, source).files, {},
                 scan_ns=scan_ns)
    known = known_files(cache, prov, source)
    assert all(unit_done(cache, u, known) for u in units)

    victim = data / "cat" / "0.jpg"
    st = victim.stat()
    body = bytearray(victim.read_bytes())
    body[len(body) // 2] ^= 0xFF  # other content, the same size
    fresh = victim.with_name("new.tmp")
    fresh.write_bytes(bytes(body))
    os.replace(fresh, victim)  # a new inode, as rsync, editors and `tar x` write files
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_ino != st.st_ino

    disc = discover(data)
    again = cut_folder(disc.root, disc.samples, source, prov, 2, disc.classes, disc.stat)
    assert [u.identity for u in again] == [u.identity for u in units]  # size and mtime alone see nothing
    which = next(u for u in again if any(s.rel == "cat/0.jpg" for s in u.samples))
    assert not unit_done(cache, which, known)
    assert all(unit_done(cache, u, known) for u in again if u is not which)
