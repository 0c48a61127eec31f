"""The pack's layout: what ComfyUI loads (the root __init__.py, nodes/, customedit_core/) never imports
the toy world's code or the test models, not even lazily; those may import the core, not the reverse."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"toyworld", "testmodels"}
PACK_FILES = sorted([ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "customedit_core").rglob("*.py")])


def imported_modules(path: Path, root: Path = ROOT):
    """(line, dotted module as seen from the repo root) of every import in a file, relative ones resolved
    (ComfyUI imports the repo root as a package, so `from ..toyworld` in nodes/ reaches toyworld/)."""
    rel = path.relative_to(root).with_suffix("").parts
    package = rel[:-1]                                 # a module's package; an __init__.py's is its folder
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module
                continue
            up = node.level - 1
            if up > len(package):
                yield node.lineno, "<above the repo root>"
                continue
            base = list(package[:len(package) - up])
            if node.module:
                yield node.lineno, ".".join(base + [node.module])
            else:                                      # from .. import x: each name may be a module
                yield from ((node.lineno, ".".join(base + [a.name])) for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            yield node.lineno, node.args[0].value


def test_the_pack_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PACK_FILES}
    assert {"__init__.py", "nodes/__init__.py", "customedit_core/api.py", "customedit_core/cli.py"} <= names


@pytest.mark.parametrize("path", PACK_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_pack_never_imports_toyworld_or_testmodels(path):
    bad = [f"line {n}: {m}" for n, m in imported_modules(path)
           if m == "<above the repo root>" or m.split(".")[0] in FORBIDDEN]
    assert not bad, f"{path.relative_to(ROOT)} imports outside the pack: {bad}"


def module_exists(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("path", PACK_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_packs_own_imports_exist(path):
    """A lazy import of a moved module (customedit_core.tiny, customedit_core.toyworld) fails only when it
    runs: each of the pack's imports of its own modules names one that exists."""
    own = [(n, m) for n, m in imported_modules(path) if m.split(".")[0] in ("customedit_core", "nodes")]
    bad = [f"line {n}: {m}" for n, m in own if not module_exists(m)]
    assert not bad, f"{path.relative_to(ROOT)} imports missing modules: {bad}"


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    (tmp_path / "nodes").mkdir()
    f = tmp_path / "nodes" / "x.py"
    f.write_text("def f():\n    from ..toyworld import world\n    from .. import testmodels\n"
                 "    import importlib\n    importlib.import_module('toyworld.model')\nfrom .edit import y\n")
    assert {m for _, m in imported_modules(f, tmp_path)} == {"toyworld", "testmodels", "importlib", "toyworld.model",
                                                              "nodes.edit"}
