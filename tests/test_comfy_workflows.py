"""workflows/: each UI-format graph (*.json, what the graph editor saves and loads; ComfyUI lists the
folder in its templates browser) and its API-format twin (api/*.api.json, what POST /prompt takes)
describe the same nodes, links and widget values.
Plain JSON checks; runs without ComfyUI (test_comfy_server.py runs the API graphs for real). Note and
MarkdownNote nodes are the editor's only (FRONTEND_ONLY): they have no API twin; the templates browser's
thumbnails, descriptions and placeholder notes are checked in test_workflows_notes.py.
"""
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
NAMES = tuple(sorted(p.name[: -len(".json")] for p in WORKFLOWS.glob("*.json")))
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}
# widget values the editor stores that are not node inputs: (after this input, how many). The frontend
# gives an input a second, "control after generate" widget when the input declares
# control_after_generate or is named seed / noise_seed (comfyui-frontend 1.27: `input.control_after_generate
# || ["seed", "noise_seed"].includes(input.name) ? 2 : 1`); LoadImage has its upload widget.
EXTRA_WIDGETS = {"LoadImage": {"image": 1}}
CONTROLLED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def extra_widgets(node_type, name):
    if name in CONTROLLED_NAMES:
        return 1
    return EXTRA_WIDGETS.get(node_type, {}).get(name, 0)


def load(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())
    return ui, api


def test_every_workflow_has_both_formats():
    ui = {p.name[: -len(".json")] for p in WORKFLOWS.glob("*.json")}
    api = {p.name[: -len(".api.json")] for p in (WORKFLOWS / "api").glob("*.json")}
    assert ui == api == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ui_graph_is_well_formed(name):
    ui, _ = load(name)
    assert ui["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in ui, key
    ids = [n["id"] for n in ui["nodes"]]
    assert len(ids) == len(set(ids)) and ui["last_node_id"] >= max(ids)
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] >= max(links)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in n, (n["id"], key)
        for slot, inp in enumerate(n["inputs"]):
            if inp.get("link") is None:
                continue
            lid, src, src_slot, dst, dst_slot, typ = links[inp["link"]]
            assert (dst, dst_slot, typ) == (n["id"], slot, inp["type"])
            out = by_id[src]["outputs"][src_slot]
            assert out["type"] == typ and lid in out["links"]
        for slot, out in enumerate(n["outputs"]):
            for lid in out.get("links") or []:
                assert links[lid][1:3] == [n["id"], slot]
    used = {inp["link"] for n in ui["nodes"] for inp in n["inputs"] if inp.get("link") is not None}
    assert used == set(links)


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_describe_the_same_graph(name):
    ui, api = load(name)
    links = {link[0]: link for link in ui["links"]}
    nodes = [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY and n.get("mode", 0) == 0]
    assert sorted(str(n["id"]) for n in nodes) == sorted(api)
    for n in nodes:
        a = api[str(n["id"])]
        assert a["class_type"] == n["type"]
        linked = {}
        for inp in n["inputs"]:
            if inp.get("link") is not None:
                _, src, src_slot, *_ = links[inp["link"]]
                linked[inp["name"]] = [str(src), src_slot]
        assert {k: v for k, v in a["inputs"].items() if isinstance(v, list)} == linked, n["id"]
        widgets = [(k, v) for k, v in a["inputs"].items() if not isinstance(v, list)]
        expected = []
        for k, v in widgets:
            expected.append(v)
            expected.extend([None] * extra_widgets(n["type"], k))
        values = list(n["widgets_values"])
        assert len(values) == len(expected), (n["id"], values, expected)
        for got, want, in zip(values, expected):
            if want is None:
                assert got in CONTROL_VALUES or got == "image", (n["id"], got)
                assert got != "randomize", (n["id"], "a shipped workflow must reproduce its result")
            else:
                assert got == want, (n["id"], got, want)


SDXL_TWINS = tuple(n for n in NAMES if n.endswith("_sdxl"))
# the stock file name each family's workflows load (the Note says to pick one's own)
STOCK_CHECKPOINT = {"sd15": "v1-5-pruned-emaonly.safetensors", "sdxl": "sd_xl_base_1.0.safetensors"}


@pytest.mark.parametrize("name", NAMES)
def test_workflows_use_a_stock_checkpoint_name_of_their_family(name):
    ui, api = load(name)
    want = STOCK_CHECKPOINT["sdxl" if name in SDXL_TWINS else "sd15"]
    loaders = [n for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loaders and all(n["inputs"]["ckpt_name"] == want for n in loaders)
    assert any(n["class_type"] == "SaveImage" for n in api.values())


def test_the_sdxl_twins_are_p2p_edit_and_custom_edit():
    assert SDXL_TWINS == ("custom_edit_sdxl", "p2p_edit_sdxl")


@pytest.mark.parametrize("name", SDXL_TWINS)
def test_an_sdxl_twin_runs_its_sd_workflows_method_with_the_same_settings(name):
    """Same nodes, links and settings as the SD1.5 workflow; only the checkpoint, the save prefixes and an
    optional CLIP Text Encode (SDXL) on Invert's sdxl_size differ."""
    _, twin = load(name)
    _, base = load(name[: -len("_sdxl")])
    size_nodes = {k for k, n in twin.items() if n["class_type"] == "CLIPTextEncodeSDXL"}
    assert set(twin) - size_nodes == set(base)
    for k, n in base.items():
        t = twin[k]
        assert t["class_type"] == n["class_type"], k
        inputs = {i: v for i, v in t["inputs"].items() if not (isinstance(v, list) and v[0] in size_nodes)}
        if n["class_type"] == "CheckpointLoaderSimple":
            continue
        if n["class_type"] == "SaveImage":
            assert inputs["filename_prefix"] == n["inputs"]["filename_prefix"].replace("customedit/", "customedit/sdxl_")
            inputs["filename_prefix"] = n["inputs"]["filename_prefix"]
        assert inputs == n["inputs"], k
    for k in size_nodes:
        sizes = {i: v for i, v in twin[k]["inputs"].items() if i not in ("clip", "text_g", "text_l")}
        assert sizes == {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                         "target_width": 1024, "target_height": 1024}
        users = [(c, i) for c, n in twin.items() for i, v in n["inputs"].items() if v == [k, 0]]
        assert [(twin[c]["class_type"], i) for c, i in users] == [("CustomEditNullTextInvert", "sdxl_size")]


def test_sdedit_uses_the_hosts_sampler_only():
    _, api = load("sdedit")
    assert not any(n["class_type"].startswith("CustomEdit") for n in api.values())
    (ks,) = [n for n in api.values() if n["class_type"] == "KSampler"]
    assert ks["inputs"]["denoise"] == 0.6


def test_every_node_is_in_some_api_workflow():
    """The server test runs every API workflow (at every model tier), so together they run every node."""
    import re

    nodes_dir = WORKFLOWS.parent / "nodes"
    ids = {m for f in nodes_dir.glob("*.py") for m in re.findall(r'node_id="(CustomEdit\w+)"', f.read_text())}
    used = {n["class_type"] for name in NAMES for n in load(name)[1].values()}
    assert ids and not ids - used, sorted(ids - used)
