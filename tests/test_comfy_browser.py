"""Every UI workflow (workflows/*.json) in ComfyUI's own graph editor, in headless Chromium: the page
of a real server on 127.0.0.1 (test_comfy_server.py's fixture, the tiny checkpoint; the tiny SDXL one for
the SDXL twins) loads the graph
with app.loadGraphData; no node type may be missing; app.graphToPrompt() must give the API twin
(workflows/api/*.api.json: the same class_type per node id, the same widget values and links); with
test_comfy_server.py's substitutions (tiny checkpoint, test image, few steps) set on the widgets, the
editor queues it (app.queuePrompt) and /history must report it finished without error.
Needs COMFYUI_DIR, ComfyUI's dependencies, the playwright package and /usr/bin/chromium (or
CUSTOMEDIT_CHROMIUM); skips otherwise. Never runs `playwright install`: it drives the system Chromium.

  COMFYUI_DIR=/tmp/ComfyUI OMP_NUM_THREADS=1 /tmp/comfy-venv/bin/python -m pytest -q tests/test_comfy_browser.py
"""
import importlib.util
import os

import pytest

import comfy_support as S

CHROMIUM = os.environ.get("CUSTOMEDIT_CHROMIUM", "/usr/bin/chromium")
# the cheap checks first: nothing heavy is imported where any of the three is missing (CI)
if S.comfy_dir() is None:
    pytest.skip("COMFYUI_DIR is not set to a ComfyUI checkout", allow_module_level=True)
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (set CUSTOMEDIT_CHROMIUM)", allow_module_level=True)
if importlib.util.find_spec("playwright") is None:
    pytest.skip("the playwright package is not installed here", allow_module_level=True)
S.skip_unless_comfy()

import json  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from playwright.sync_api import sync_playwright  # noqa: E402

# the server fixture and the API twins' substitutions of the server test (one server for this module)
from test_comfy_server import RUN_TIMEOUT, _needs_concept_file, ensure_concept_file, patched  # noqa: E402
from test_comfy_server import server  # noqa: E402,F401  - the module-scoped fixture

NAMES = tuple(sorted(p.name[: -len(".json")] for p in S.WORKFLOWS.glob("*.json")))
# the editor is the same at every model tier; a workflow is queued on a server of its family (the SDXL twins'
# CLIP Text Encode (SDXL) needs SDXL's two text encoders)
CASES = [pytest.param("sdxl" if n.endswith("_sdxl") else "tiny", n, id=n) for n in NAMES]
APP_TIMEOUT_MS = 240_000          # the editor's first load (an 11 MB bundle) on a busy 2-core machine
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# Installed once per page: records what the frontend itself reports as missing (ComfyApp.loadGraphData
# collects every node whose type is not in LiteGraph.registered_node_types and hands the list to the
# extensions' afterConfigureGraph hook, besides its "missing nodes" dialog), and every /prompt answer
# of api.queuePrompt (the call app.queuePrompt makes), so the test learns the prompt id or the error.
INSTALL_PROBES = """() => {
  window.__ce = {missing: null, queued: []};
  app.registerExtension({name: "customedit.tests.probe",
                         afterConfigureGraph(missing) { window.__ce.missing = JSON.parse(JSON.stringify(missing)); }});
  const orig = app.api.queuePrompt.bind(app.api);
  app.api.queuePrompt = async (...a) => {
    try { const r = await orig(...a); window.__ce.queued.push({ok: true, response: r}); return r; }
    catch (e) { window.__ce.queued.push({ok: false, error: String(e), response: e.response ?? null}); throw e; }
  };
}"""

LOAD = """async (graph) => {
  const unregistered = graph.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(graph);
  const broken = app.graph.nodes.filter(n => n.has_errors).map(n => [n.id, n.type]);
  return {unregistered, missing: window.__ce.missing, broken, count: app.graph.nodes.length};
}"""

TO_PROMPT = "async () => (await app.graphToPrompt()).output"

# values by node id and input name onto the editor's widgets; returns what had no widget of that name
SET_WIDGETS = """(values) => {
  const absent = [];
  for (const [id, inputs] of Object.entries(values)) {
    const node = app.graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(inputs)) {
      const w = node?.widgets?.find(w => w.name === name);
      if (w) w.value = value; else absent.push([id, name]);
    }
  }
  return absent;
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def editor(browser, server):
    """A fresh page of the server's graph editor, ready (window.app set: the app has set up and registered
    every node definition); yields (page, the page's uncaught errors)."""
    # a new user would get the templates browser over the canvas; harmless, but not what is under test
    req = urllib.request.Request(server.url + "/settings", data=json.dumps({"Comfy.TutorialCompleted": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}"))
    try:
        page.goto(server.url + "/", timeout=APP_TIMEOUT_MS)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                               " && 'CustomEditP2PEdit' in LiteGraph.registered_node_types",
                               timeout=APP_TIMEOUT_MS, polling=500)
        page.evaluate(INSTALL_PROBES)
        # only what the workflow causes counts: the 1.27 frontend itself throws once while it sets up a
        # new user's settings (Comfy.Canvas.NavigationMode's onChange sets a setting not yet registered)
        errors.clear()
        yield page, errors
    finally:
        context.close()


def _graph(prompt):
    """An API graph as {node id: (class_type, inputs)}: what the comparison looks at (not _meta)."""
    return {k: (n["class_type"], n["inputs"]) for k, n in prompt.items()}


def _refusal(queued):
    """What /prompt answered the editor, short: per node, its class and its errors' details."""
    out = []
    for q in queued:
        errors = (q.get("response") or {}).get("node_errors") or {}
        out.append(q.get("error") if not errors else
                   {k: (e.get("class_type"), [x.get("details") for x in e.get("errors", [])]) for k, e in errors.items()})
    return out


def _wait_done(server, pid):
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, "server died:\n" + server.log_tail()
        hist = server.get(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("status_str") in ("success", "error"):
            return hist[pid]
        time.sleep(0.5)
    pytest.fail(f"prompt {pid} did not finish in {RUN_TIMEOUT}s:\n" + server.log_tail())


@pytest.mark.parametrize("server,name", CASES, indirect=["server"])
def test_editor_loads_converts_and_queues_the_workflow(server, editor, name):
    page, page_errors = editor
    ui = json.loads((S.WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((S.WORKFLOWS / "api" / f"{name}.api.json").read_text())

    loaded = page.evaluate(LOAD, ui)
    assert loaded["unregistered"] == [], f"{name}: node types the editor does not know: {loaded['unregistered']}"
    assert loaded["missing"] == [], f"{name}: the editor reports missing node types: {loaded['missing']}"
    assert loaded["broken"] == [] and loaded["count"] == len(ui["nodes"]), (name, loaded)

    # the editor's conversion of the shipped graph is its API twin
    assert _graph(page.evaluate(TO_PROMPT)) == _graph(api), name

    # the server test's substitutions, set where a user would set them: on the widgets
    run = patched(name, server)
    changes = {k: {i: v for i, v in n["inputs"].items() if not isinstance(v, list) and api[k]["inputs"].get(i) != v}
               for k, n in run.items()}
    assert page.evaluate(SET_WIDGETS, {k: c for k, c in changes.items() if c}) == [], name
    assert _graph(page.evaluate(TO_PROMPT)) == _graph(run), name

    if _needs_concept_file(run):
        ensure_concept_file(server)
    ok = page.evaluate("async () => await app.queuePrompt(0)")
    queued = page.evaluate("() => window.__ce.queued")
    # (its return value is no success flag: it is false whenever /prompt answers node_errors, even {})
    assert len(queued) == 1 and queued[0]["ok"], (name, ok, _refusal(queued))
    entry = _wait_done(server, queued[0]["response"]["prompt_id"])
    assert entry["status"]["status_str"] == "success", (name, entry["status"], server.log_tail())
    assert _graph(entry["prompt"][2]) == _graph(run), name        # what ran is what the editor showed
    assert entry["outputs"], (name, entry)
    if name == "concept_train":            # the later workflows load what it saved (as the server test does)
        server.concept_ready = (server.root / "models" / "concepts" / "my_concept.safetensors").is_file()
    assert page_errors == [], (name, page_errors)


@pytest.mark.parametrize("server", ["tiny"], indirect=True)
def test_the_probe_sees_a_missing_node_type(server, editor):
    """The missing-node check above can fail: a type the server does not have is reported as missing."""
    page, _ = editor
    ui = json.loads((S.WORKFLOWS / "p2p_edit.json").read_text())
    node = next(n for n in ui["nodes"] if n["type"] == "CustomEditP2PEdit")
    node["type"] = "CustomEditNoSuchNode"
    loaded = page.evaluate(LOAD, ui)
    assert loaded["unregistered"] == ["CustomEditNoSuchNode"], loaded
    assert loaded["missing"] == ["CustomEditNoSuchNode"], loaded
    assert loaded["broken"] == [[node["id"], "CustomEditNoSuchNode"]], loaded
