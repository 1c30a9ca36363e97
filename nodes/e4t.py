"""E4T nodes (the E4T paper): load a pre-trained E4T file (domain encoder + weight offsets) and tune it on one photo for
5-15 steps; the result is applied to copies of MODEL and CLIP and can be written by Save Concept. Thin: the work is
in e4t_host.py (ComfyUI side) and backend/e4t.py. Nothing heavy is imported until a node runs."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from .quicktune import EmbeddingType, LoRAType, checkpointing_input

CATEGORY = "BoothKit"
MODEL_FOLDER = "e4t"  # models/e4t, registered in nodes/__init__.py

E4TType = io.Custom("BOOTHKIT_E4T")


def _host():
    from ..hosts.comfy import e4t as e4t_host

    return e4t_host


class LoadE4T(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitLoadE4T",
            display_name="Load E4T",
            category=CATEGORY,
            description="Loads a pre-trained E4T file (domain encoder and weight offsets, `boothkit train e4t`) from "
                        "models/e4t and checks its metadata.",
            inputs=[io.Combo.Input("e4t_name", options=folder_paths.get_filename_list(MODEL_FOLDER),
                                   tooltip="An E4T .safetensors file in models/e4t.")],
            outputs=[E4TType.Output(display_name="e4t")],
        )

    @classmethod
    def validate_inputs(cls, e4t_name) -> bool | str:
        if folder_paths.get_full_path(MODEL_FOLDER, e4t_name) is None:
            return (f"E4T file '{e4t_name}' is not in models/{MODEL_FOLDER} (searched "
                    f"{', '.join(folder_paths.get_folder_paths(MODEL_FOLDER))})")
        return True

    @classmethod
    def fingerprint_inputs(cls, e4t_name):
        path = folder_paths.get_full_path(MODEL_FOLDER, e4t_name)
        return os.path.getmtime(path) if path else e4t_name

    @classmethod
    def execute(cls, e4t_name) -> io.NodeOutput:
        return io.NodeOutput(_host().load(folder_paths.get_full_path_or_raise(MODEL_FOLDER, e4t_name)))


class E4TTune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitE4TTune",
            display_name="E4T Tune",
            category=CATEGORY,
            description="Personalizes from ONE photo: the E4T encoder predicts the identifier's embedding, then "
                        "5-15 steps tune the encoder and the weight offsets. Returns copies of MODEL (offsets as "
                        "weight patches) and CLIP (the identifier's token is the embedding); the inputs are not "
                        "changed. Prompt with the identifier, e.g. 'a photo of sks cat'.",
            inputs=[
                E4TType.Input("e4t"),
                io.Model.Input("model", tooltip="The model the E4T file was pre-trained for."),
                io.Clip.Input("clip", tooltip="The model's CLIP."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the E4T file was pre-trained with."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the photo once."),
                io.Image.Input("image", tooltip="One photo of the subject (the first of a batch is used)."),
                io.Int.Input("steps", default=15, min=0, max=200,
                             tooltip="Tuning steps (paper: 5-15); 0 uses the encoder's prediction alone."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=0.000001,
                               tooltip="0: the rate stored in the E4T file."),
                io.String.Input("identifier", default="sks", tooltip="The word that will mean the subject."),
                io.String.Input("class_noun", default="",
                                tooltip="What the subject is (one token, e.g. cat); empty: the file's class word."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="The photo is resized (shorter side) and centre-cropped to it."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the noise and timesteps."),
                checkpointing_input(),
                io.Mask.Input("mask", optional=True, tooltip="Optional: 1 on the subject; crops the encoder's view "
                                                             "and restricts the loss."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A copy of the model with the tuned offsets."),
                io.Clip.Output(display_name="clip", tooltip="A copy of the CLIP with the identifier's embedding."),
                EmbeddingType.Output(display_name="embedding", tooltip="The embedding, for Save Concept."),
                LoRAType.Output(display_name="lora", tooltip="The offsets as a weight-diff LoRA, for Save Concept."),
                io.String.Output(display_name="report", tooltip="Steps and losses of the run."),
            ],
        )

    @classmethod
    def execute(cls, e4t, model, clip, clip_vision, vae, image, steps, learning_rate, identifier, class_noun,
                resolution, seed, gradient_checkpointing=True, mask=None) -> io.NodeOutput:
        out = _host().e4t_tune(model, clip, clip_vision, vae, e4t, image, class_noun, identifier=identifier,
                               mask=mask, steps=steps, lr=learning_rate, resolution=resolution, seed=seed,
                               gradient_checkpointing=gradient_checkpointing)
        return io.NodeOutput(out.model, out.clip, out.embedding, out.lora, out.report)


NODES = [LoadE4T, E4TTune]
