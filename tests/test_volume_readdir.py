"""A directory listed while it changes: every entry that is there from the listing's start
to its end is returned exactly once (POSIX leaves only the added and removed ones open).

The kernel asks a FUSE daemon for a directory a page at a time and passes back the offset of
the last entry it took; a daemon whose offsets are positions in the current listing skips
entries when earlier ones go and repeats them when earlier ones come.  That is what
busybox's ``rm -r`` (which unlinks as it reads) and ``find -delete``-style programs hit:
"Directory not empty" on a directory of a few hundred files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import new_volume_mounted

N = 600  # many READDIRPLUS pages: ~25 entries of these names fit in one


def _fill(d: Path) -> set[str]:
    d.mkdir()
    names = {f"file-{i:04d}-{'x' * 24}" for i in range(N)}
    for name in names:
        (d / name).write_bytes(b"")
    return names


def test_unlinking_while_listing_empties_the_directory(tmp_path: Path) -> None:
    with new_volume_mounted(tmp_path / "volumes", tmp_path / "mnt", tmp_path / "cache") as mnt:
        d = mnt / "d"
        names = _fill(d)
        seen = []
        with os.scandir(d) as it:  # readdir(3): one getdents a FUSE page, unlinking between them
            for entry in it:
                seen.append(entry.name)
                os.unlink(entry.path)
        assert sorted(seen) == sorted(names)
        assert os.listdir(d) == []
        d.rmdir()


@pytest.mark.parametrize("change", ["add", "rename"])
def test_entries_added_or_renamed_while_listing_do_not_repeat_or_hide_the_others(tmp_path: Path,
                                                                                 change: str) -> None:
    with new_volume_mounted(tmp_path / "volumes", tmp_path / "mnt", tmp_path / "cache") as mnt:
        d = mnt / "d"
        names = _fill(d)
        (mnt / "elsewhere").mkdir()
        seen = []
        with os.scandir(d) as it:
            for i, entry in enumerate(it):
                seen.append(entry.name)
                if entry.name not in names or i % 2:
                    continue
                if change == "add":  # a new name that sorts before every other
                    (d / f"a-new-{i:04d}").write_bytes(b"")
                else:
                    os.rename(entry.path, mnt / "elsewhere" / entry.name)
        kept = [n for n in seen if n in names]
        assert sorted(kept) == sorted(names)  # each original exactly once, renamed ones included
        assert len(seen) == len(set(seen))
