"""Writing a set of files into model folders: names that stay inside, all files or none.

Save Concept writes up to three files (the concept, a LoRA, an embedding) into three folders. A
name is checked against the real folder (symlinks resolved: a link inside the folder must not lead
outside), every file is first written to a temporary file beside its target, and only then are the
temporaries put in place. Without overwrite, placing is `os.link`, which fails if the name exists
(two saves racing for one name cannot both win, and a symlink at the target, dangling or not, is
never replaced); with overwrite it is `os.replace`. If any step fails, the files this call placed
are removed again (an overwritten file gets its old content back) and the error names the input.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable

from .errors import InputError

SUFFIX = ".safetensors"
NAME_MAX = 255          # bytes in one path component on common file systems


def target(root: str, name: str, input_name: str, label: str) -> str:
    """<root>/<name>.safetensors, for a name that may hold sub-folders but never leaves `root`
    (also not through a symlink); `label` names the folder in errors (e.g. 'models/concepts/')."""
    raw = (name or "").strip()
    if not raw or any(c in raw for c in "\0\n\r") or os.path.isabs(raw) or raw.startswith(("/", "\\")) or ":" in raw:
        raise InputError(input_name, f"{name!r} is not a file name; expected e.g. 'my_dog' (saved in {label})")
    stem = raw[: -len(SUFFIX)] if raw.endswith(SUFFIX) else raw
    parts = stem.replace("\\", "/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(input_name, f"{name!r} would be written outside {label}; give a plain name")
    if any(len(p.encode("utf-8")) + len(SUFFIX) > NAME_MAX for p in parts):
        raise InputError(input_name, f"{name[:40]!r}... is too long for a file name (at most "
                                     f"{NAME_MAX - len(SUFFIX)} bytes per part)")
    real_root = os.path.realpath(root)
    path = os.path.join(real_root, *parts[:-1], parts[-1] + SUFFIX)
    parent = os.path.realpath(os.path.dirname(path))
    if os.path.commonpath([real_root, parent]) != real_root:
        raise InputError(input_name, f"{name!r} leads outside {label} (through a symbolic link); give a plain name")
    return os.path.join(parent, os.path.basename(path))


def write_all(files: list[tuple[str, Callable[[str], object]]], overwrite: bool, input_name: str) -> list[str]:
    """Write each (path, write(tmp_path)) as one transaction; returns the paths."""
    for path, _ in files:
        if os.path.lexists(path) and (not overwrite or os.path.islink(path) or not os.path.isfile(path)):
            what = "a symbolic link" if os.path.islink(path) else "in the way" if not os.path.isfile(path) else "exists"
            raise InputError(input_name, f"{path} {what}; choose another name"
                                         + ("" if os.path.islink(path) or not os.path.isfile(path)
                                            else " or enable overwrite"))
    temps, placed, backups = [], [], {}
    try:
        for path, write in files:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=os.path.dirname(path))
            os.close(fd)
            temps.append(tmp)
            write(tmp)
        for (path, _), tmp in zip(files, temps):
            if overwrite:
                if os.path.isfile(path):          # kept until every file is in place, to undo with
                    backups[path] = tmp + ".old"
                    os.link(path, backups[path])
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise InputError(input_name, f"{path} was written by someone else meanwhile; choose another "
                                                 "name or enable overwrite") from None
            placed.append(path)
    except OSError as e:
        _undo(placed, backups)
        raise InputError(input_name, f"could not write {getattr(e, 'filename', None) or 'the files'}: "
                                     f"{e.strerror or e}; nothing was saved") from None
    except BaseException:
        _undo(placed, backups)
        raise
    finally:
        for tmp in temps + list(backups.values()):
            if os.path.lexists(tmp):
                os.remove(tmp)
    return [p for p, _ in files]


def _undo(placed, backups):
    """Put back what was there before: the old file where one was overwritten, nothing elsewhere."""
    for p in placed:
        try:
            if p in backups:
                os.replace(backups.pop(p), p)
            else:
                os.remove(p)
        except OSError:
            pass
