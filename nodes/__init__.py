"""ComfyUI node schemas (V3). Node ids are stable and prefixed `CustomEdit`."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .edit import NODES


class CustomEditExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> CustomEditExtension:
    return CustomEditExtension()
