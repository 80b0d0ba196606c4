"""Crash-safe writes (ckpttools.atomic): the moments a kill -9 can hit, replayed deterministically."""

import pytest

from ckpttools.atomic import atomic_write, keep_previous, previous_path


def _tmp_files(folder):
    return sorted(p.name for p in folder.glob(".*.tmp"))


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and _tmp_files(tmp_path) == []
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and _tmp_files(tmp_path) == []


def test_keep_previous_keeps_the_old_bytes(tmp_path):
    target = tmp_path / "last.pt"
    assert keep_previous(target) is None  # nothing to keep yet
    target.write_bytes(b"epoch1")
    prev = keep_previous(target)
    assert prev == previous_path(target) == tmp_path / "last.prev.pt"
    with atomic_write(target) as f:
        f.write(b"epoch2")
    assert prev.read_bytes() == b"epoch1" and target.read_bytes() == b"epoch2"


def test_keep_previous_after_a_save_cut_short_leaves_no_temporary_file(tmp_path):
    """kill -9 between keep_previous and the replace of last.pt: prev is a hard link to last.pt.

    The next save's keep_previous used to link last.pt again and rename(2) between two names of one inode
    does nothing, so the temporary name stayed behind (a CI failure of the kill -9 test).
    """
    target = tmp_path / "last.pt"
    target.write_bytes(b"epoch1")
    keep_previous(target)  # ... and the process dies here, before last.pt is replaced
    keep_previous(target)  # the resumed run's first save
    assert _tmp_files(tmp_path) == []
    assert previous_path(target).read_bytes() == b"epoch1"
    with atomic_write(target) as f:
        f.write(b"epoch2")
    assert previous_path(target).read_bytes() == b"epoch1"
    keep_previous(target)
    assert previous_path(target).read_bytes() == b"epoch2"
    assert _tmp_files(tmp_path) == []


def _folder(path, text: str):
    path.mkdir()
    (path / "data").write_text(text)
    return path


def test_publish_folder_swaps_in_the_new_folder_and_keeps_the_one_it_replaced(tmp_path):
    from ckpttools.atomic import publish_folder

    last = tmp_path / "last.dcp"
    publish_folder(_folder(tmp_path / "a", "first"), last)
    assert (last / "data").read_text() == "first" and not previous_path(last).exists()
    publish_folder(_folder(tmp_path / "b", "second"), last)
    publish_folder(_folder(tmp_path / "c", "third"), last)
    assert (last / "data").read_text() == "third"
    assert (tmp_path / "last.prev.dcp" / "data").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.dcp", "last.prev.dcp"]  # the oldest removed


def test_link_folder_shares_the_files_and_replaces_an_older_copy(tmp_path):
    from ckpttools.atomic import link_folder

    src = _folder(tmp_path / "src", "new")
    dst = _folder(tmp_path / "best.dcp", "old")
    link_folder(src, dst)
    assert (dst / "data").read_text() == "new"
    assert (dst / "data").stat().st_ino == (src / "data").stat().st_ino  # hard links, no second copy of the bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.dcp", "src"]
