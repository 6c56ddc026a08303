"""files.py: crash-safe writing. A write is the old file or the new one, never half; a temporary
folder is removed only when its mark proves it ours and its writer gone; one run holds a folder."""
import os

import pytest

import files


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["notes.txt"]
    files.write_json(path, {"new": 1})
    assert path.read_text() == '{\n  "new": 1\n}\n' and os.listdir(tmp_path) == ["notes.txt"]


def test_a_published_folder_holds_what_was_written_and_no_mark(tmp_path):
    with files.temporary_folder(tmp_path, "out", "test folder being written by pid") as tmp:
        (tmp / "a.txt").write_text("a")
        assert (tmp / files.WRITING).read_text().startswith("test folder being written by pid")
        files.publish_folder(tmp, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["a.txt"]


def test_a_folder_not_published_is_removed(tmp_path):
    with pytest.raises(OSError):
        with files.temporary_folder(tmp_path, "out", "test folder being written by pid") as tmp:
            (tmp / "a.txt").write_text("a")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


def plant(folder, mark_text=None):
    folder.mkdir()
    (folder / "payload").write_text("data")
    if mark_text is not None:
        (folder / files.WRITING).write_text(f"{mark_text} 12345\n")
    return folder


def test_only_abandoned_folders_whose_mark_proves_them_ours_are_removed(tmp_path):
    text, said = "export being written by pid", []
    dead = plant(tmp_path / ".out-0123abcd.tmp", text)  # a killed writer's: nobody holds the mark
    unmarked = plant(tmp_path / ".out-89abcdef.tmp")  # a user's folder of that shape
    other_text = plant(tmp_path / ".out-00000000.tmp", "my own notes")
    other_name = plant(tmp_path / ".out-extra-11111111.tmp", text)  # another target's (out-extra)
    not_hex = plant(tmp_path / ".out-mine.tmp", text)
    with files.temporary_folder(tmp_path, "out", text) as alive:  # a live writer: its mark is locked
        files.remove_abandoned(tmp_path, "out", text, said.append)
        assert alive.exists()
    assert not dead.exists() and len(said) == 1 and str(dead) in said[0]
    assert all(p.exists() for p in (unmarked, other_text, other_name, not_hex))


def test_a_name_with_wildcards_matches_only_itself(tmp_path):
    text = "export being written by pid"
    other = plant(tmp_path / ".out-x-0123abcd.tmp", text)
    files.remove_abandoned(tmp_path, "out-*", text, print)  # a target named out-* is not a pattern
    assert other.exists()


def test_a_second_run_is_refused_the_folder_while_the_first_holds_it(tmp_path):
    first = files.FolderLock(tmp_path, "s1", key="sweep.dir")
    with pytest.raises(files.OutputError, match=r"is in use by another run \(pid \d+ on .*, run s1\); .* sweep.dir"):
        files.FolderLock(tmp_path, "s2", key="sweep.dir")
    first.release()
    files.FolderLock(tmp_path, "s3", key="sweep.dir").release()
    assert "run s3" in (tmp_path / files.LOCK).read_text()
