"""The command line's --help tells the truth: each default stated once, and equal to the parser's."""
import argparse
import re

import pytest

from customedit_core.cli import build_parser, main

SUBCOMMANDS = sorted(next(a for a in build_parser()._actions
                          if isinstance(a, argparse._SubParsersAction)).choices)


def _blocks(text):
    """{option string: its help entry on one line} from argparse's help text."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line.strip()
        elif current and line.startswith("      "):
            prev = blocks[current]
            # argparse may wrap after a hyphen ("1e-" / "05"): join those without a space
            blocks[current] = prev + ("" if prev.endswith("-") else " ") + line.strip()
        else:
            current = None
    return blocks


def _help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_is_covered():
    assert SUBCOMMANDS == ["dci", "diffedit", "edit", "import-concept", "info", "maps", "specref", "train-concept"]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_states_each_default_once_and_truly(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    blocks = _blocks(_help(name, capsys))
    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for action in parser._actions:
        if not action.option_strings or action.option_strings == ["-h", "--help"]:
            continue
        opt = action.option_strings[-1]
        text = blocks[opt]
        assert text.count("default") <= 1, f"{name} {opt}: default stated more than once: {text}"
        d = action.default
        if d is None or d is False:
            continue                      # decided at run time: described in words, if at all
        if d == "":
            assert "(default: empty)" in text or "(default: " in text, f"{name} {opt}: {text}"
            continue
        assert f"(default: {d})" in text, f"{name} {opt}: the parser's default is {d!r}, help says: {text}"


def test_specref_states_its_own_inversion_method(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert "(default: direct)" in _blocks(_help("specref", capsys))["--method"]
    assert "(default: null_text)" in _blocks(_help("edit", capsys))["--method"]


def test_method_choices_are_the_inversion_methods():
    from customedit_core.inversion import METHODS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("edit", "maps", "specref", "dci"):
        method = next(a for a in sub[name]._actions if "--method" in a.option_strings)
        assert tuple(method.choices) == METHODS
