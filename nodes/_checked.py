"""Queue-time checks: what the inputs alone can tell fails when the prompt is queued, not after
minutes of inversion or training.

ComfyUI calls a node's `validate_inputs` with its widget values (linked inputs arrive as None) and,
for the inputs it receives, skips its own min/max and combo checks; so `CheckedNode` does those
itself for every widget, adds what ComfyUI never checks (NaN and inf pass its min/max comparisons),
then the node's own `check_inputs`. The same checks run again in `execute` for the values that came
through links.

ComfyUI runs both on a locked clone of the node class (no attribute may be set), so they read the schema
from `define_schema()`: GET_SCHEMA caches it on the class and fails there.
"""
from __future__ import annotations

import functools
import math

from comfy_api.latest import io

from ..customedit_core.errors import InputError


def check_widgets(schema: io.Schema, values: dict) -> None:
    """Raise InputError for a widget value that is non-finite, out of its range or not an option."""
    for inp in schema.inputs:
        v = values.get(inp.id)
        if v is None:
            continue
        if isinstance(inp, (io.Float.Input, io.Int.Input)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(inp.id, f"expected a number, got {v!r}")
            if not math.isfinite(v):
                raise InputError(inp.id, f"expected a finite number, got {v}")
            if inp.min is not None and v < inp.min or inp.max is not None and v > inp.max:
                raise InputError(inp.id, f"{v} is outside [{inp.min}, {inp.max}]")
        elif isinstance(inp, io.Combo.Input) and inp.options and v not in inp.options:
            shown = inp.options if len(inp.options) <= 20 else f"one of {len(inp.options)} files"
            raise InputError(inp.id, f"{v!r} is not one of {shown}")


class CheckedNode(io.ComfyNode):
    """A node whose inputs are checked at queue time (see the module's docstring)."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        own = cls.__dict__.get("execute")
        # run the checks again on every value, linked ones too; once: ComfyUI's class clones (and their
        # locked copies, which refuse the assignment) carry the already wrapped execute in their dict
        if isinstance(own, classmethod) and not getattr(own.__func__, "_checked", False):
            run = own.__func__

            @functools.wraps(run)
            def execute(klass, **values):
                check_widgets(klass.define_schema(), values)
                # here None is a value not given (as an unconnected optional input: absent), not a link
                klass.check_inputs(**{k: v for k, v in values.items() if v is not None})
                return run(klass, **values)
            execute._checked = True
            cls.execute = classmethod(execute)

    @classmethod
    def check_inputs(cls, **values) -> None:
        """The node's own rules on its values; raise InputError. At queue time a linked input is there
        as None and an unconnected optional one is absent; at execute every given value is there."""

    @classmethod
    def validate_inputs(cls, **values):
        try:
            check_widgets(cls.define_schema(), values)
            cls.check_inputs(**values)
        except InputError as e:
            return str(e)
        return True
