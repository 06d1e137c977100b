"""The one atomic-write helper (easyedit_agrade.atomic): a crash mid-write leaves the old file or folder intact."""
import json
import os
import stat
from pathlib import Path

import pytest

from easyedit_agrade.atomic import atomic_dir, atomic_path, atomic_write_text


class Crash(RuntimeError):
    pass


def test_text_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "r.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, json.dumps({"new": 1}))
    assert json.loads(target.read_text()) == {"new": 1}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # what open(path, "w") gives


def test_crash_mid_write_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("the old content")
    with pytest.raises(Crash):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise Crash("killed mid-write")
    assert target.read_text() == "the old content"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_interrupt_is_handled_like_a_crash(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("kept")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "kept" and len(list(tmp_path.iterdir())) == 1


def test_checkpoint_and_bench_writers_use_the_helper(tmp_path, monkeypatch):
    """A crash inside the safetensors/JSON writers of core.checkpoint keeps the previous file."""
    import torch

    from easyedit_agrade.bench.runner import atomic_write_text as bench_writer
    from easyedit_agrade.core import checkpoint

    assert bench_writer is atomic_write_text
    path = tmp_path / "w.safetensors"
    checkpoint.save_tensors(path, {"w": torch.ones(3)}, {"v": 1})
    before = path.read_bytes()

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 7)  # a truncated header
        raise Crash("killed")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save_file)
    with pytest.raises(Crash):
        checkpoint.save_tensors(path, {"w": torch.zeros(3)}, {"v": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]

    checkpoint.save_json(tmp_path / "s.json", {"a": 1})
    monkeypatch.setattr(checkpoint.json, "dump", lambda *a, **k: (_ for _ in ()).throw(Crash("killed")))
    with pytest.raises(Crash):
        checkpoint.save_json(tmp_path / "s.json", {"a": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}


def test_folder_build_is_all_or_nothing(tmp_path):
    target = tmp_path / "step-00000001"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(Crash):
        with atomic_dir(target, replace_existing=True) as tmp:
            (tmp / "a").write_text("2")
            raise Crash("killed")
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    with atomic_dir(target, replace_existing=True) as tmp:
        (tmp / "b").write_text("3")
    assert [p.name for p in target.iterdir()] == ["b"]


def test_folder_rename_onto_an_existing_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "done").write_text("complete")
    with pytest.raises(OSError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("mine")
    with atomic_dir(target, accept_existing=lambda t: (t / "done").exists()) as tmp:  # a concurrent writer won
        (tmp / "x").write_text("mine")
    assert [p.name for p in target.iterdir()] == ["done"] and len(list(tmp_path.iterdir())) == 1


def _folder(target, text):
    """``target`` built with one file ``w`` holding ``text`` (what a replace must never lose)."""
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text(text)
    return target


def _replace_into(target, text):
    with atomic_dir(target, replace_existing=True) as tmp:
        (tmp / "w").write_text(text)


def test_folder_replace_keeps_the_previous_version_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """replace_existing moves the old folder aside and deletes it only after the rename: a failing rename puts it
    back, a failing pre-rename check leaves it untouched, and no hidden sibling is left either way."""
    import easyedit_agrade.atomic as atomic

    target = _folder(tmp_path / "model", "old")

    def refuse():
        raise Crash("target changed while saving")

    with pytest.raises(Crash):
        with atomic_dir(target, replace_existing=True, check_before_rename=refuse) as tmp:
            (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]

    real_replace = os.replace
    seen = []

    def failing_rename(src, dst):
        seen.append((Path(src).name, Path(dst).name))
        if Path(dst) == target and ".partial-" in Path(src).name:
            assert not target.exists()  # the old version is aside (not deleted) while the new one moves in
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        _replace_into(target, "new")
    assert (target / "w").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [d for _, d in seen] == ["previous", "model", "model"]  # aside, the failed rename, back

    monkeypatch.setattr(atomic.os, "replace", real_replace)
    _replace_into(target, "new")
    assert (target / "w").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_folder_replace_keeps_the_previous_version_aside_if_it_cannot_be_put_back(tmp_path, monkeypatch):
    import easyedit_agrade.atomic as atomic

    target = _folder(tmp_path / "model", "old")
    real_replace = os.replace

    def no_rename_onto_target(src, dst):
        if Path(dst) == target:
            raise OSError("read-only parent")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", no_rename_onto_target)
    with pytest.raises(OSError, match="read-only"):
        _replace_into(target, "new")
    (aside,) = [p for p in tmp_path.iterdir()]  # the new build is gone; the previous one is kept, not deleted
    assert aside.name.startswith(".model.old-") and (aside / "previous" / "w").read_text() == "old"
