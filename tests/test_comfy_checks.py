"""Queue-time checks of every node (validate_inputs), in-process: non-finite numbers, ranges and
options (ComfyUI skips its own checks for what a node validates), and the nodes' own rules.

  COMFYUI_DIR=/tmp/comfyui /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_checks.py
"""
import comfy_support as S

S.skip_unless_comfy()

import math  # noqa: E402

import pytest  # noqa: E402

from comfy_support import expect_input_error, run_node as run  # noqa: E402


def _nodes(comfy):
    return {k: v for k, v in comfy.NODE_CLASS_MAPPINGS.items() if k in S.NODE_IDS}


def _widgets(cls):
    from comfy_api.latest import io
    return [i for i in cls.GET_SCHEMA().inputs if isinstance(i, (io.Float.Input, io.Int.Input, io.Combo.Input))]


def test_every_node_checks_its_widgets_at_queue_time(comfy):
    from comfy_api.latest import io
    checked = 0
    for node_id, cls in _nodes(comfy).items():
        assert cls.validate_inputs() is True, node_id                 # everything linked or left out: fine
        for inp in _widgets(cls):
            bad = [float("nan"), float("inf"), -float("inf")] if isinstance(inp, io.Float.Input) else []
            if isinstance(inp, (io.Float.Input, io.Int.Input)) and inp.max is not None:
                bad.append(inp.max + 1)
            if isinstance(inp, io.Combo.Input) and inp.options:
                bad.append("no such option")
            for v in bad:
                msg = cls.validate_inputs(**{inp.id: v})
                assert isinstance(msg, str) and msg.startswith(f"{inp.id}: "), (node_id, inp.id, v, msg)
                checked += 1
            if getattr(inp, "default", None) is not None:
                ok = cls.validate_inputs(**{inp.id: inp.default})
                assert ok is True or not ok.startswith(f"{inp.id}: "), (node_id, inp.id, ok)
    assert checked > 60


def test_node_rules_that_the_inputs_alone_can_tell(comfy, tmp_path):
    nodes = _nodes(comfy)
    p2p = nodes["CustomEditP2PEdit"]
    assert p2p.validate_inputs(target_prompt=" ").startswith("target_prompt: ")
    assert p2p.validate_inputs(target_prompt="a dog", reweight="dog:inf").startswith("reweight: ")
    assert p2p.validate_inputs(target_prompt="a dog", blend_words="", blend_target_words="dog").startswith("blend_words: ")
    assert p2p.validate_inputs(target_prompt=None, reweight="dog:2") is True          # a linked prompt
    assert nodes["CustomEditNullTextInvert"].validate_inputs(source_prompt="").startswith("source_prompt: ")
    train = nodes["CustomEditTrainConcept"]
    for token in ("a cat", "(x)", "", "[1]"):
        assert train.validate_inputs(token=token, class_word="dog").startswith("token: "), token
    assert train.validate_inputs(token="<new1>", class_word=" ").startswith("class_word: ")
    assert nodes["CustomEditLoadConcept"].validate_inputs(concept_name="(none)").startswith("concept_name: ")
    assert nodes["CustomEditLoadConcept"].validate_inputs(concept_name="(none)", concept=None) is True   # linked
    save = nodes["CustomEditSaveConcept"]
    for name in ("../x", "a\0b", "x" * 300, "/abs"):
        assert save.validate_inputs(name=name).startswith("name: "), name


def test_linked_values_are_checked_when_the_node_runs(comfy):
    """A NaN that arrives through a link (no widget to check at queue time) is refused by execute."""
    msg = expect_input_error("strength", run, comfy, "CustomEditLoadConcept", model=None, clip=None,
                             concept_name="(none)", strength=math.nan, concept=None)
    assert "finite" in msg
