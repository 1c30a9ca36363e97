"""Two-stage quick-tune nodes: tune a concept from a few photos inside ComfyUI (textual inversion of the
identifier, then a LoRA on the denoiser) and save it as files stock ComfyUI and A1111 load. Thin: the work is in
hosts/comfy/quicktune.py (ComfyUI side) and backend/quicktune.py. Nothing heavy is imported until a node runs."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from . import CATEGORIES, host

CATEGORY = CATEGORIES["quicktune"]
EMBEDDINGS_FOLDER, LORAS_FOLDER = "embeddings", "loras"  # ComfyUI's own model folders

# the values travelling on these links: backend.embedding.Embedding, and ComfyUI's own LORA_MODEL (a state dict that
# Load LoRA Model and Save LoRA take; ours is hosts.comfy.common.LoraModel, which also carries the file's metadata);
# other methods (E4T) produce the same types, so one Save Concept node writes them all
EmbeddingType = io.Custom("BOOTHKIT_EMBEDDING")
LoRAType = io.LoraModel
EMBEDDING_TIP = "The learned embedding (the identifier's token vector), for Save Concept."
LORA_TIP = ("The learned LoRA (kohya keys), for Save Concept; also ComfyUI's LORA_MODEL, so Load LoRA Model and Save "
            "LoRA take it.")


def seed_input(tooltip: str) -> io.Int.Input:
    """A tune's seed: no 'control after generate' (declared, so the frontend adds none): a seed that changed after
    every run would tune again at every Queue; a fixed seed reruns only what changed downstream."""
    return io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, tooltip=tooltip)


def checkpointing_input() -> io.Boolean.Input:
    """The tuning nodes' gradient_checkpointing input (Quick-Tune Concept, E4T Tune)."""
    return io.Boolean.Input("gradient_checkpointing", default=True,
                            tooltip="Recompute the denoiser's activations in the backward pass: the same result "
                                    "with about a third of the memory, somewhat more time. On by default, as in "
                                    "ComfyUI's own Train LoRA node; off only on a card with room to spare.")


class QuickTuneConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        # defaults are QuickTuneConfig.sd()'s (the paper's setting); a stub-tier test keeps them equal
        return io.Schema(
            node_id="BoothKitQuickTuneConcept",
            display_name="Quick-Tune Concept",
            category=CATEGORY,
            description="Learns a subject from a few photos in two stages: the identifier's token vector (textual "
                        "inversion, everything else frozen), then a LoRA on the denoiser with the text encoder "
                        "frozen. Returns copies of MODEL and CLIP with the result applied (the inputs are not "
                        "changed), plus the embedding and LoRA for Save Concept. Prompt with the identifier, e.g. "
                        "'a photo of sks cat'.",
            inputs=[
                io.Model.Input("model", tooltip="The Stable Diffusion model to tune (SD1.x, SD2.x or SDXL)."),
                io.Clip.Input("clip", tooltip="The model's CLIP (from the same checkpoint)."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the photos once."),
                io.Image.Input("images", tooltip="Photos of the subject, as one batch (4-6 is typical)."),
                io.String.Input("identifier", default="sks",
                                tooltip="The rare word that will mean the subject; must be one token."),
                io.String.Input("class_noun", default="person",
                                tooltip="What the subject is (cat, dog, person, ...); the training prompt is 'a photo "
                                        "of <identifier> <class noun>'."),
                io.String.Input("init_word", default="",
                                tooltip="Word whose token vector starts stage 1; must be one token. Empty: the class "
                                        "noun."),
                io.Int.Input("embedding_steps", default=100, min=0, max=10000,
                             tooltip="Stage 1 steps (paper: ~100); 0 skips it (DreamBooth-style, the identifier's own "
                                     "vector)."),
                io.Float.Input("embedding_lr", default=0.005, min=0.000001, max=1.0, step=0.000001,
                               tooltip="Stage 1 learning rate (paper: 5e-3)."),
                io.Int.Input("denoiser_steps", default=300, min=0, max=10000,
                             tooltip="Stage 2 steps (paper: 200-400); 0 skips it (textual inversion alone)."),
                io.Float.Input("denoiser_lr", default=0.0001, min=0.000001, max=1.0, step=0.000001,
                               tooltip="Stage 2 (LoRA) learning rate."),
                io.Int.Input("lora_rank", default=4, min=1, max=128, tooltip="Rank of the denoiser LoRA."),
                io.Int.Input("resolution", default=512, min=32, max=2048, step=32,
                             tooltip="Training size: photos are resized (shorter side) and centre-cropped to it. "
                                     "512 for SD1.x, 768 for SD2.x-768, 1024 for SDXL, 32 for the toy world."),
                seed_input("Seed of the LoRA's start, batches, noise and timesteps (fixed: Queue again reruns only "
                           "what changed after this node)."),
                # on, unlike QuickTuneConfig (the CLI's --gradient-checkpointing): ComfyUI's own Train LoRA node
                # defaults to it, and the node trains beside the loaded models on the user's card
                checkpointing_input(),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: 1 on the subject, one per image (or one for all); the loss counts "
                                      "only the subject. LoadImage's alpha mask is 1 on the transparent part: invert "
                                      "it first."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A copy of the model with the LoRA applied."),
                io.Clip.Output(display_name="clip",
                               tooltip="A copy of the CLIP whose identifier token is the learned vector."),
                EmbeddingType.Output(display_name="embedding", tooltip=EMBEDDING_TIP),
                LoRAType.Output(display_name="lora", tooltip=LORA_TIP),
                io.String.Output(display_name="report", tooltip="Steps, losses and notes of the run."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, identifier, class_noun, init_word, embedding_steps, embedding_lr,
                denoiser_steps, denoiser_lr, lora_rank, resolution, seed, gradient_checkpointing=True,
                mask=None) -> io.NodeOutput:
        out = host("quicktune").quick_tune(model, clip, vae, images, class_noun, identifier=identifier,
                                           init_word=init_word, masks=mask, embedding_steps=embedding_steps,
                                           embedding_lr=embedding_lr, denoiser_steps=denoiser_steps,
                                           denoiser_lr=denoiser_lr, rank=lora_rank, resolution=resolution, seed=seed,
                                           gradient_checkpointing=gradient_checkpointing)
        return io.NodeOutput(out.model, out.clip, out.embedding, host("common").as_lora_model(out.lora), out.report)


class SaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitSaveConcept",
            display_name="Save Concept",
            category=CATEGORIES["concepts"],
            description="Saves a learned embedding to models/embeddings/<name>.safetensors (prompt with "
                        "embedding:<name> in ComfyUI, <name> in A1111), a LoRA to "
                        "models/loras/<name>_lora.safetensors (LoraLoader), and an E4T concept compactly to "
                        "models/e4t_concepts/<name>_e4t.safetensors (Load E4T Concept). Existing files are kept "
                        "unless overwrite is on.",
            inputs=[
                EmbeddingType.Input("embedding", optional=True,
                                    tooltip="A learned embedding (Quick-Tune Concept, E4T Tune)."),
                LoRAType.Input("lora", optional=True,
                               tooltip="A BoothKit LoRA (Quick-Tune Concept, E4T Tune); for Train LoRA's output use "
                                       "ComfyUI's Save LoRA."),
                io.Custom("BOOTHKIT_E4T_CONCEPT").Input(
                    "e4t_concept", optional=True,
                    tooltip="E4T Tune's concept: the compact native file (a few MB; E4T's default save). E4T Tune's "
                            "lora is the stock-loader export: fp16 weight diffs, about 2 bytes per weight the "
                            "offsets touch (~0.5 GB for SD1.5)."),
                io.String.Input("name", default="my_concept",
                                tooltip="File name: letters, digits, '.', '_' and '-' (anything else becomes '_'; "
                                        "folders are dropped)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace files of the same name."),
            ],
            outputs=[io.String.Output(display_name="paths", tooltip="The files written, one per line.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name=None, overwrite=None) -> bool | str:
        if not isinstance(name, str):  # a linked name is checked when the node runs
            return True
        from ..backend.files import safe_name

        try:
            safe_name(name)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, name, overwrite, embedding=None, lora=None, e4t_concept=None) -> io.NodeOutput:
        paths = host("quicktune").save_concept(embedding, host("common").from_lora_model(lora), name, overwrite,
                                     folder_paths.get_folder_paths(EMBEDDINGS_FOLDER)[0],
                                     folder_paths.get_folder_paths(LORAS_FOLDER)[0], e4t_concept,
                                     folder_paths.get_folder_paths("e4t_concepts")[0])
        text = "\n".join(str(p) for p in paths)
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [QuickTuneConcept, SaveConcept]
