"""What the templates browser and the Comfy Registry read, checked without ComfyUI.

Templates (ComfyUI 0.3.64, app/custom_node_manager.py): GET /workflow_templates lists
custom_nodes/*/workflows/*.json (one level: workflows/api/ is not listed) and serves the folder at
/api/workflow_templates/<pack>/. The frontend (comfyui-frontend-package 1.27.10) shows each as a card
with the thumbnail <name>.jpg (its mediaSubtype is always "jpg" for custom nodes) and the file name as
title and description; so every UI workflow has a JPEG beside it, and what to replace and in which
order to run it is said in a Note node on the canvas (its first line is the description, kept in
extra.description too).

Registry (comfy-cli `comfy node publish` and ComfyUI's comfy_config read pyproject.toml's [project] and
[tool.comfy]; `dependencies` literally, no dynamic fields): the same dependencies as requirements.txt,
without torch; one version.
"""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NAMES = tuple(sorted(p.name[: -len(".json")] for p in WORKFLOWS.glob("*.json")))
PACK_SOURCES = sorted([ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "customedit_core").rglob("*.py")])
# widget values that are example files the user must replace: (node type, input), as in the API twin
PLACEHOLDER_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"),
                      ("CustomEditLoadConcept", "concept_name")}


def _toml(path):
    try:
        import tomllib
    except ImportError:                                     # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _requirement_names(reqs):
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def pyproject():
    return _toml(ROOT / "pyproject.toml")


# ---- the registry ------------------------------------------------------------------------------

def test_pyproject_dependencies_are_requirements_txt_without_torch():
    project = pyproject()["project"]
    assert "dependencies" not in project.get("dynamic", []), "comfy-cli reads dependencies literally"
    deps = project["dependencies"]
    assert sorted(deps) == sorted(requirements())
    assert len(set(deps)) == len(deps)
    names = _requirement_names(deps)
    assert not {n for n in names if n == "torch" or n.startswith("torch")}, names


def test_pyproject_registry_fields():
    data = pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] == "customedit"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["description"].strip()
    assert project["license"] == {"file": "LICENSE"}
    assert comfy == {"PublisherId": "customedit", "DisplayName": "customedit", "Icon": ""}


def test_license_is_mit_for_the_customedit_authors():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the customedit authors" in text
    assert "Same licence as the rest" in (ROOT / "toyworld" / "weights" / "README.md").read_text()


def test_every_version_the_code_states_is_pyprojects():
    version = pyproject()["project"]["version"]
    stated = {}
    for f in PACK_SOURCES:
        for m in re.finditer(r"""^\s*__version__\s*=\s*["']([^"']+)["']""", f.read_text(), re.M):
            stated[str(f.relative_to(ROOT))] = m.group(1)
    assert all(v == version for v in stated.values()), (version, stated)


def test_sources_parse_at_the_lowest_python_the_pyproject_admits():
    spec = pyproject()["project"]["requires-python"]
    m = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert m, spec
    for f in PACK_SOURCES:
        ast.parse(f.read_text(), str(f), feature_version=(3, int(m.group(1))))


# ---- the templates browser ---------------------------------------------------------------------

def load(name):
    return (json.loads((WORKFLOWS / f"{name}.json").read_text()),
            json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text()))


def note_of(ui):
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, [n["type"] for n in ui["nodes"]]
    (note,) = notes
    assert not note["inputs"] and not note["outputs"]
    assert len(note["widgets_values"]) == 1 and isinstance(note["widgets_values"][0], str)
    return note["widgets_values"][0]


def test_the_listed_templates_are_the_ui_graphs_and_each_has_an_api_twin():
    """ComfyUI lists workflows/*.json (not recursively): only UI graphs lie there, no index file, and the API
    twins sit one level down, one per UI graph and nothing else."""
    assert NAMES and "index" not in NAMES
    for name in NAMES:
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert "nodes" in ui and "links" in ui, f"{name}.json is not a UI-format graph"
    api = sorted(p.name for p in (WORKFLOWS / "api").iterdir())
    assert api == sorted(f"{n}.api.json" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_a_small_square_jpeg_named_like_the_workflow(name):
    from PIL import Image

    path = WORKFLOWS / f"{name}.jpg"
    assert path.is_file(), f"{path.name} missing: run bench/thumbnails.py {name}"
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"
    assert path.stat().st_size <= 40_000, path.stat().st_size
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size[0] == im.size[1] >= 128, (im.format, im.size)


def test_no_thumbnail_without_a_workflow():
    assert sorted(p.name[: -len(".jpg")] for p in WORKFLOWS.glob("*.jpg")) == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_description_is_one_line_and_opens_the_note(name):
    ui, _ = load(name)
    desc = ui["extra"]["description"]
    assert isinstance(desc, str) and desc.strip() == desc and desc and "\n" not in desc and len(desc) <= 140
    assert note_of(ui).split("\n", 1)[0] == desc


@pytest.mark.parametrize("name", NAMES)
def test_note_names_every_placeholder_and_the_run_order(name):
    ui, api = load(name)
    text = note_of(ui)
    placeholders = {n["inputs"][k] for n in api.values() for (t, k) in PLACEHOLDER_INPUTS if n["class_type"] == t}
    assert placeholders
    for value in placeholders:
        assert f"`{value}`" in text, (name, value)
    assert "Run order:" in text
    if any(n["class_type"] == "CustomEditLoadConcept" for n in api.values()):
        assert "run *concept_train* first" in text
    if any(n["class_type"] == "CustomEditSaveConcept" for n in api.values()):
        assert "run this first" in text


def test_concept_workflows_load_what_concept_train_saves():
    _, train = load("concept_train")
    (saved,) = [n["inputs"]["name"] for n in train.values() if n["class_type"] == "CustomEditSaveConcept"]
    loaders = [n for name in NAMES for n in load(name)[1].values() if n["class_type"] == "CustomEditLoadConcept"]
    assert loaders and all(n["inputs"]["concept_name"] == f"{saved}.safetensors" for n in loaders)


@pytest.mark.parametrize("name", NAMES)
def test_notes_stay_out_of_the_api_prompt_and_above_the_graph(name):
    ui, api = load(name)
    (note,) = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert str(note["id"]) not in api and all(n["class_type"] != "Note" for n in api.values())
    x, y = note["pos"]
    w, h = note["size"]
    for n in ui["nodes"]:
        if n is note:
            continue
        nx, ny = n["pos"]
        nw, nh = n["size"]
        assert x + w <= nx or nx + nw <= x or y + h <= ny or ny + nh <= y, (name, "overlaps", n["id"])
    # the saved view (extra.ds: screen = (canvas + offset) * scale) starts with the Note's top on screen
    ds = ui["extra"]["ds"]
    assert 0 <= (y + ds["offset"][1]) * ds["scale"] <= 100


def test_thumbnail_script_has_a_method_for_every_workflow():
    """bench/thumbnails.py regenerates the .jpg files; it must know every workflow (pure: only its source)."""
    tree = ast.parse((ROOT / "bench" / "thumbnails.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Thumbnails"]
    methods = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
    assert set(NAMES) <= methods, sorted(set(NAMES) - methods)
