"""ComfyUI node schemas (V3). Node ids are stable and prefixed `CustomEdit`.

Every module in this package that defines `NODES` contributes them, so a new family of
nodes is one new file, not an edit here.
"""
import importlib
import pkgutil

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io


def _all_nodes() -> list:
    nodes = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        nodes.extend(getattr(module, "NODES", ()))
    return nodes


class CustomEditExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return _all_nodes()


async def comfy_entrypoint() -> CustomEditExtension:
    return CustomEditExtension()
