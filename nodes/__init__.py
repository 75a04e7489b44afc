"""ComfyUI nodes of the pack (V3 schema): thin adapters over `optimizers`."""
from comfy_api.latest import ComfyExtension, io

NODES: list[type[io.ComfyNode]] = []


class CalibratedSamplersExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> CalibratedSamplersExtension:
    return CalibratedSamplersExtension()
