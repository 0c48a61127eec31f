"""The pack in a real ComfyUI server on 127.0.0.1: every workflows/api/*.api.json is posted to /prompt
(with the generated tiny checkpoint, a generated input image and few steps) and must write images.
Needs COMFYUI_DIR (a ComfyUI checkout) and ComfyUI's dependencies in this interpreter; skips otherwise.

  COMFYUI_DIR=/tmp/comfyui OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_server.py
"""
import sys

import comfy_support as S

S.skip_unless_comfy()

import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

START_TIMEOUT = 180
RUN_TIMEOUT = 900          # a bound, not a target: real-shape workflows on 2 CPU cores take minutes
FEW_STEPS = {"CustomEditNullTextInvert": {"steps": 4, "inner_steps": 2}, "KSampler": {"steps": 4},
             "CustomEditReferenceKVExtract": {"steps": 4}, "CustomEditDiffEditMask": {"samples": 2},
             "CustomEditDiffEditSample": {"steps": 4},
             "CustomEditTrainConcept": {"steps": 2, "class_images_count": 1, "batch_size": 1},
             "CustomEditSaveConcept": {"overwrite": True}, "CustomEditDCISample": {"steps": 4},
             "EmptyLatentImage": {"width": 64, "height": 64}}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url, root, proc, log):
        self.url, self.root, self.proc, self.log = url, root, proc, log

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log_tail(self, n=4000):
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def run(self, prompt):
        """Queue an API graph; wait (bounded) for its history entry."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "customedit-tests"})
        assert status == 200, (body, self.log_tail())
        pid = body["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server died:\n" + self.log_tail()
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            time.sleep(0.5)
        pytest.fail(f"prompt {pid} did not finish in {RUN_TIMEOUT}s:\n" + self.log_tail())


# model tiers: the tiny checkpoints (SD1.x and SDXL) always; SD1.5's and SD2.x's exact shapes in the
# real-shapes tier. Every workflow runs on every tier but the SDXL twins (*_sdxl), which run on SDXL only
# (their size node, ComfyUI's CLIP Text Encode (SDXL), needs SDXL's two text encoders)
TIERS = [pytest.param("tiny", id="tiny"), pytest.param("sdxl", id="sdxl"),
         pytest.param("sd15", id="sd15", marks=pytest.mark.realshapes),
         pytest.param("sd2", id="sd2", marks=pytest.mark.realshapes)]


@pytest.fixture(scope="module", params=TIERS)
def server(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "comfy"
    ckpt = S.checkpoint(base, request.param)
    root = tmp_path_factory.mktemp(f"server-{request.param}")
    dirs = {k: root / k for k in ("input", "output", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    S.write_test_image(dirs["input"])
    paths = root / "paths.yaml"
    models = {k: root / "models" / k for k in ("concepts", "loras", "embeddings")}
    for d in models.values():
        d.mkdir(parents=True)
    # is_default: these come first, so SaveConcept writes here and not into the ComfyUI checkout
    paths.write_text(f"customedit_tests:\n    is_default: true\n    checkpoints: {base / 'checkpoints'}\n"
                     f"    custom_nodes: {S.custom_nodes_dir(base)}\n"
                     + "".join(f"    {k}: {d}\n" for k, d in models.items()))
    port = _free_port()
    log = root / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
           "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--extra-model-paths-config", str(paths),
           "--input-directory", str(dirs["input"]), "--output-directory", str(dirs["output"]),
           "--temp-directory", str(dirs["temp"]), "--user-directory", str(dirs["user"])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=str(S.comfy_dir()), env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", root, proc, log)
    srv.ckpt, srv.tier = ckpt, request.param
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                missing = [ln for ln in srv.log_tail(20000).splitlines() if ln.startswith("ModuleNotFoundError")]
                if missing:                  # ComfyUI's own dependencies are incomplete here
                    pytest.skip(f"ComfyUI cannot start with {sys.executable}: {missing[-1]}")
                pytest.fail("ComfyUI exited during start:\n" + srv.log_tail())
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {START_TIMEOUT}s:\n" + srv.log_tail())
                time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def for_tier(name, server):
    """The workflow of that method for the server's model family: on SDXL its SDXL twin where there is one."""
    twin = f"{name}_sdxl"
    return twin if server.tier == "sdxl" and (S.WORKFLOWS / "api" / f"{twin}.api.json").is_file() else name


def patched(name, server):
    prompt = json.loads((S.WORKFLOWS / "api" / f"{name}.api.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = server.ckpt
        elif node["class_type"] == "LoadImage":
            inputs["image"] = S.IMAGE_NAME
        elif node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = f"{inputs['filename_prefix']}_{uuid.uuid4().hex[:8]}"
        inputs.update(FEW_STEPS.get(node["class_type"], {}))
    return prompt


def test_server_lists_the_nodes(server):
    info = server.get("/object_info")
    for node_id in S.NODE_IDS:
        assert node_id in info, node_id
        assert info[node_id]["category"].startswith("customedit/")
    assert info["CustomEditNullTextInvert"]["output"] == ["CE_INVERSION", "LATENT"]
    assert "customedit" in info["CustomEditP2PEdit"]["python_module"]


def test_server_offers_the_ui_workflows_as_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates["customedit"]) == sorted(p.name[: -len(".json")] for p in S.WORKFLOWS.glob("*.json"))
    served = server.get("/api/workflow_templates/customedit/p2p_edit.json")
    assert served == json.loads((S.WORKFLOWS / "p2p_edit.json").read_text())


def _needs_concept_file(prompt):
    return any(n["class_type"] == "CustomEditLoadConcept" and "concept" not in n["inputs"] for n in prompt.values())


def ensure_concept_file(server):
    """Workflows that load models/concepts/my_concept.safetensors get it from the concept_train workflow."""
    if not getattr(server, "concept_ready", False):
        entry = server.run(patched("concept_train", server))
        assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
        assert (server.root / "models" / "concepts" / "my_concept.safetensors").is_file()
        server.concept_ready = True


@pytest.mark.parametrize("name", sorted(p.name[: -len(".api.json")] for p in (S.WORKFLOWS / "api").glob("*.api.json")))
def test_workflow_runs_and_writes_images(server, name):
    if name.endswith("_sdxl") and server.tier != "sdxl":
        pytest.skip("an SDXL workflow")
    prompt = patched(name, server)
    if _needs_concept_file(prompt):
        ensure_concept_file(server)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
    saved = [n for n, node in prompt.items() if node["class_type"] in ("SaveImage", "PreviewImage")]
    assert saved
    for node_id in saved:
        images = entry["outputs"].get(node_id, {}).get("images", [])
        assert images, (node_id, entry["outputs"])
        for img in images:
            # --temp-directory D puts previews in D/temp
            folder = server.root / "output" if img["type"] == "output" else server.root / "temp" / "temp"
            path = folder / img.get("subfolder", "") / img["filename"]
            assert path.is_file() and path.stat().st_size > 0, path
    if name == "attention_maps":
        n_words = len(prompt["4"]["inputs"]["source_prompt"].split())
        assert len(entry["outputs"]["6"]["images"]) == n_words


def test_bad_input_reports_the_input_name(server):
    prompt = patched(for_tier("p2p_edit", server), server)
    prompt["5"]["inputs"]["target_prompt"] = "a photo of a big tiger sitting on the grass"   # replace: 8 vs 9 words
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "CustomEditP2PEdit"
    assert errors[0]["exception_message"].startswith("target_prompt: ")


def _through(prompt, node_id):
    """The part of an API graph that runs for node_id: its outputs and what they need. ComfyUI queues
    a graph's valid outputs and answers 200 when only some are refused; keeping just node_id's
    outputs makes a refusal of node_id refuse the whole prompt (400)."""
    parents = {k: [v[0] for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2]
               for k, n in prompt.items()}
    down = {node_id}
    while True:
        more = {k for k, ps in parents.items() if k not in down and down.intersection(ps)}
        if not more:
            break
        down |= more
    keep, todo = set(), list(down)
    while todo:
        k = todo.pop()
        if k not in keep:
            keep.add(k)
            todo.extend(parents[k])
    return {k: prompt[k] for k in keep}


def _refused_at_queue_time(server, prompt, node_id, input_name):
    """POST /prompt answers 400 with the node's error naming the input; nothing was run."""
    prompt = _through(prompt, node_id)
    before = len(server.get("/history"))
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "customedit-tests"})
    assert status == 400, body
    errors = body["node_errors"][node_id]["errors"]
    assert any(f"{input_name}: " in e["details"] for e in errors), errors
    assert len(server.get("/history")) == before
    return errors


@pytest.mark.parametrize("field,value", [("strength", float("nan")), ("strength", float("inf"))])
def test_non_finite_numbers_are_refused_when_queued(server, field, value):
    ensure_concept_file(server)               # so that the only thing wrong is the number
    prompt = patched(for_tier("custom_edit", server), server)
    node = next(k for k, n in prompt.items() if n["class_type"] == "CustomEditLoadConcept")
    prompt[node]["inputs"][field] = value
    _refused_at_queue_time(server, prompt, node, field)


def test_prompt_level_mistakes_are_refused_when_queued(server):
    p2p = for_tier("p2p_edit", server)
    prompt = patched(p2p, server)
    prompt["5"]["inputs"]["target_prompt"] = "   "
    _refused_at_queue_time(server, prompt, "5", "target_prompt")
    prompt = patched(p2p, server)
    prompt["5"]["inputs"]["reweight"] = "cat:nan"
    _refused_at_queue_time(server, prompt, "5", "reweight")
    prompt = patched(p2p, server)
    prompt["5"]["inputs"]["cross_replace"] = 1.5                 # ComfyUI's own range check still holds
    _refused_at_queue_time(server, prompt, "5", "cross_replace")
    prompt = patched("concept_train", server)
    train = next(k for k, n in prompt.items() if n["class_type"] == "CustomEditTrainConcept")
    prompt[train]["inputs"]["token"] = "a cat"
    _refused_at_queue_time(server, prompt, train, "token")

