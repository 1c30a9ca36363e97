"""The toy world's nodes: its models as ordinary ComfyUI MODEL / CLIP / VAE / CLIP_VISION, and photos of its subjects,
so every BoothKit method runs in the graph editor with nothing but the pack (no download). The work is in
hosts/comfy/toyworld.py; nothing heavy is imported until a node runs."""
from __future__ import annotations

from comfy_api.latest import io

from . import CATEGORIES, host

CATEGORY = CATEGORIES["toyworld"]


class ToyWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitToyWorldLoader",
            display_name="Toy World Loader",
            category=CATEGORY,
            description="The toy world shipped with BoothKit (a 32x32 pixel-space diffusion model of toy cats and "
                        "robots, ~25 MB) as ordinary ComfyUI models: sample it with CLIPTextEncode, KSampler "
                        "(ddim/simple, ~20 steps, cfg ~3), VAE Decode and Save Image; the latent is "
                        "EmptyChromaRadianceLatentImage 32x32 (3 channels). Its InstantBooth and E4T files are "
                        "toy_instantbooth.safetensors / toy_e4t.safetensors in the loaders.",
            inputs=[],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The toy base model (family 'toy', text width 64)."),
                io.Clip.Output(display_name="CLIP", tooltip="The toy text encoder and tokenizer."),
                io.Vae.Output(display_name="VAE", tooltip="Pixel space: decoding maps -1..1 to 0..1."),
                io.ClipVision.Output(display_name="CLIP_VISION",
                                     tooltip="The toy CLIP vision model the toy InstantBooth and E4T files use."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import folder_paths

        return io.NodeOutput(*host("toyworld").load_toy_world(folder_paths.get_folder_paths("embeddings")))


class ToySubjectPhotos(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitToySubjectPhotos",
            display_name="Toy Subject Photos",
            category=CATEGORY,
            description="Photos of one toy-world subject (a cat or robot with its own colours, pattern, eyes and "
                        "ears/antenna) in random scenes, with masks: what LoadImage gives for your own photos. "
                        "Identities 1000-1031 were never seen in training (held out).",
            inputs=[
                io.Int.Input("identity", default=1000, min=0, max=1031,
                             tooltip="Which subject: 0-319 were seen in training, 1000-1031 are held out (never "
                                     "seen); each id is a cat or a robot."),
                io.Int.Input("count", default=4, min=1, max=16, tooltip="How many photos."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the scenes, poses and lighting."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The photos, 32x32, one batch."),
                io.Mask.Output(display_name="masks", tooltip="1 on the subject, one per photo."),
                io.String.Output(display_name="class_noun", tooltip="What the subject is: cat or robot."),
            ],
        )

    @classmethod
    def execute(cls, identity, count, seed) -> io.NodeOutput:
        return io.NodeOutput(*host("toyworld").subject_photos(identity, count, seed))


NODES = [ToyWorldLoader, ToySubjectPhotos]
