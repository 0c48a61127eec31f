"""Saving a set of files into model folders: names stay inside (symlinks too), all files or none."""
import os
import threading

import pytest

from customedit_core import file_set
from customedit_core.errors import InputError


def _writer(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


@pytest.fixture
def folders(tmp_path):
    roots = {k: tmp_path / "models" / k for k in ("concepts", "loras", "embeddings")}
    for r in roots.values():
        r.mkdir(parents=True)
    return roots


def test_names_stay_in_their_folder_even_through_symlinks(folders, tmp_path):
    root = folders["concepts"]
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(InputError, match="symbolic link") as e:
        file_set.target(str(root), "link/evil", "name", "models/concepts/")
    assert e.value.input_name == "name"
    for bad in ("../x", "/etc/x", "a/../../x", "", "  ", "a\0b", "a\nb", "c:x", "x" * 250):
        with pytest.raises(InputError):
            file_set.target(str(root), bad, "name", "models/concepts/")
    (root / "sub").mkdir()
    assert file_set.target(str(root), "sub/my_dog", "name", "m/") == str((root / "sub" / "my_dog.safetensors").resolve())
    assert file_set.target(str(root), "dog.safetensors", "name", "m/").endswith("/dog.safetensors")


def test_all_files_or_none(folders):
    paths = [str(folders[k] / "dog.safetensors") for k in ("concepts", "loras", "embeddings")]
    os.mkdir(paths[1])                                     # a directory where the LoRA goes
    with pytest.raises(InputError, match="in the way"):
        file_set.write_all([(p, _writer("new")) for p in paths], overwrite=True, input_name="name")
    os.rmdir(paths[1])

    def broken(tmp):
        raise OSError(28, "No space left on device", tmp)
    with pytest.raises(InputError, match="nothing was saved"):
        file_set.write_all([(paths[0], _writer("a")), (paths[1], broken), (paths[2], _writer("c"))], False, "name")
    assert not any(os.path.lexists(p) for p in paths)
    assert not [f for k in folders for f in os.listdir(folders[k])]      # no temporaries left either


def test_a_failed_overwrite_puts_the_old_files_back(folders, monkeypatch):
    paths = [str(folders[k] / "dog.safetensors") for k in ("concepts", "loras")]
    file_set.write_all([(p, _writer("old")) for p in paths], False, "name")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if dst == paths[1]:
            raise OSError(13, "Permission denied", dst)
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(InputError, match="nothing was saved"):
        file_set.write_all([(p, _writer("new")) for p in paths], True, "name")
    monkeypatch.setattr(os, "replace", real_replace)
    assert [open(p).read() for p in paths] == ["old", "old"]
    assert sorted(os.listdir(folders["concepts"])) == ["dog.safetensors"]


def test_no_overwrite_is_exclusive_and_never_replaces_links(folders, tmp_path):
    path = str(folders["concepts"] / "dog.safetensors")
    file_set.write_all([(path, _writer("first"))], False, "name")
    with pytest.raises(InputError, match="exists; choose another name or enable overwrite"):
        file_set.write_all([(path, _writer("second"))], False, "name")
    assert open(path).read() == "first"
    file_set.write_all([(path, _writer("second"))], True, "name")
    assert open(path).read() == "second"
    dangling = str(folders["loras"] / "dog.safetensors")
    os.symlink(str(tmp_path / "nowhere"), dangling)
    for overwrite in (False, True):
        with pytest.raises(InputError, match="symbolic link"):
            file_set.write_all([(dangling, _writer("x"))], overwrite, "name")
    assert not os.path.exists(tmp_path / "nowhere")


def test_concurrent_saves_to_one_name_have_one_winner(folders):
    path = str(folders["concepts"] / "race.safetensors")
    barrier = threading.Barrier(6)
    outcome = []

    def save(k):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(str(k))
            barrier.wait()                  # every saver has checked and written before any places
        try:
            file_set.write_all([(path, write)], False, "name")
            outcome.append(("ok", k))
        except InputError:
            outcome.append(("refused", k))
    threads = [threading.Thread(target=save, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for r, k in outcome if r == "ok"]
    assert len(winners) == 1 and open(path).read() == str(winners[0])
