"""BoothKit: personalize Stable Diffusion from a few photos (InstantBooth, E4T, two-stage quick-tune).

This file is both the ComfyUI entry point (the repository is the node pack) and the top of the ``boothkit`` Python
package. It imports nothing heavy: ComfyUI's modules are imported only when ComfyUI asks for the extension."""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import BoothKitExtension

    return BoothKitExtension()
