"""E4T nodes (the E4T paper): load a pre-trained E4T file (domain encoder + weight offsets) and tune it on one photo for
5-15 steps; the result is applied to copies of MODEL and CLIP and can be written by Save Concept. Thin: the work is
in hosts/comfy/e4t.py (ComfyUI side) and backend/e4t.py. Nothing heavy is imported until a node runs."""
from __future__ import annotations

from comfy_api.latest import io

from . import CATEGORIES, check_file, empty_folder_note, file_fingerprint, file_options, file_path, host
from .quicktune import EMBEDDING_TIP, EmbeddingType, LoRAType, checkpointing_input, seed_input

CATEGORY = CATEGORIES["e4t"]
MODEL_FOLDER = "e4t"  # models/e4t, registered (and created) in nodes/__init__.py

E4TType = io.Custom("BOOTHKIT_E4T")
E4TConceptType = io.Custom("BOOTHKIT_E4T_CONCEPT")  # hosts.comfy.e4t.TunedConcept
CONCEPTS_FOLDER = "e4t_concepts"  # models/e4t_concepts: Save Concept writes <name>_e4t.safetensors there


class LoadE4T(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitLoadE4T",
            display_name="Load E4T",
            category=CATEGORY,
            description="Loads a pre-trained E4T file (domain encoder and weight offsets, `boothkit train e4t`) from "
                        "models/e4t and checks its metadata (and, with a model connected, that it was pre-trained for "
                        "that model's family)." + empty_folder_note(MODEL_FOLDER, "pre-train one with `boothkit "
                                                                              "train e4t`"),
            inputs=[io.Combo.Input("e4t_name", options=file_options(MODEL_FOLDER),
                                   tooltip="An E4T .safetensors file in models/e4t."),
                    io.Model.Input("model", optional=True,
                                   tooltip="Optional: the model it will tune, to reject a file made for another base "
                                           "model right away.")],
            outputs=[E4TType.Output(display_name="e4t", tooltip="The E4T encoder and weight offsets, checked.")],
        )

    @classmethod
    def validate_inputs(cls, e4t_name) -> bool | str:
        return check_file(MODEL_FOLDER, e4t_name, "E4T")

    @classmethod
    def fingerprint_inputs(cls, e4t_name, model=None):
        return file_fingerprint(MODEL_FOLDER, e4t_name)

    @classmethod
    def execute(cls, e4t_name, model=None) -> io.NodeOutput:
        return io.NodeOutput(host("e4t").load(file_path(MODEL_FOLDER, e4t_name), model))


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
                E4TType.Input("e4t", tooltip="The pre-trained E4T file (from Load E4T)."),
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
                io.Int.Input("resolution", default=512, min=32, max=2048, step=32,
                             tooltip="The photo is resized (shorter side) and centre-cropped to it."),
                seed_input("Seed of the noise and timesteps (fixed: Queue again reruns only what changed after this "
                           "node)."),
                checkpointing_input(),
                io.Mask.Input("mask", optional=True, tooltip="Optional: 1 on the subject; crops the encoder's view "
                                                             "and restricts the loss."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A copy of the model with the tuned offsets."),
                io.Clip.Output(display_name="clip", tooltip="A copy of the CLIP with the identifier's embedding."),
                EmbeddingType.Output(display_name="embedding", tooltip=EMBEDDING_TIP),
                LoRAType.Output(display_name="lora",
                                tooltip="The tuned offsets as weight diffs (fp16, about 2 bytes per UNet weight they "
                                        "touch), for Save Concept; also ComfyUI's LORA_MODEL."),
                io.String.Output(display_name="report", tooltip="Steps and losses of the run."),
                E4TConceptType.Output(display_name="concept",
                                      tooltip="The tuned concept, compact (offsets, the photo's scales, the "
                                              "embedding; a few MB): Save Concept writes it to models/e4t_concepts, "
                                              "Load E4T Concept applies it."),
            ],
        )

    @classmethod
    def execute(cls, e4t, model, clip, clip_vision, vae, image, steps, learning_rate, identifier, class_noun,
                resolution, seed, gradient_checkpointing=True, mask=None) -> io.NodeOutput:
        out = host("e4t").e4t_tune(model, clip, clip_vision, vae, e4t, image, class_noun, identifier=identifier,
                               mask=mask, steps=steps, lr=learning_rate, resolution=resolution, seed=seed,
                               gradient_checkpointing=gradient_checkpointing)
        return io.NodeOutput(out.model, out.clip, out.embedding, host("common").as_lora_model(out.lora), out.report,
                             out.concept)


class LoadE4TConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitLoadE4TConcept",
            display_name="Load E4T Concept",
            category=CATEGORY,
            description="Applies a saved E4T concept (Save Concept's <name>_e4t.safetensors in models/e4t_concepts, "
                        "or `boothkit tune --method e4t`) to copies of MODEL and CLIP: the tuned offsets as weight "
                        "patches, the identifier's embedding in the CLIP. The inputs are not changed. A concept "
                        "tuned on another base model is refused.",
            inputs=[
                io.Combo.Input("concept_name", options=file_options(CONCEPTS_FOLDER),
                               tooltip="A compact E4T concept in models/e4t_concepts (empty: none saved yet)."),
                io.Model.Input("model", tooltip="The model the concept was tuned on."),
                io.Clip.Input("clip", tooltip="That model's CLIP."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A copy of the model with the concept's offsets."),
                io.Clip.Output(display_name="clip", tooltip="A copy of the CLIP with the identifier's embedding."),
                io.String.Output(display_name="report", tooltip="The concept's identifier and class word."),
                E4TConceptType.Output(display_name="concept",
                                      tooltip="The concept itself, for Concept Hook (the concept in one region of "
                                              "the image, beside others)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, concept_name) -> bool | str:
        return check_file(CONCEPTS_FOLDER, concept_name, "E4T concept")

    @classmethod
    def fingerprint_inputs(cls, concept_name, model=None, clip=None):
        return file_fingerprint(CONCEPTS_FOLDER, concept_name)

    @classmethod
    def execute(cls, concept_name, model, clip) -> io.NodeOutput:
        return io.NodeOutput(*host("e4t").load_concept(file_path(CONCEPTS_FOLDER, concept_name), model, clip))


NODES = [LoadE4T, E4TTune, LoadE4TConcept]
