"""InstantBooth nodes: load a file, encode concept images, patch the MODEL with the adapters, put the concept
token into the prompt. Each node is thin: the work is in hosts/comfy/instantbooth.py (ComfyUI side) and backend/.
Nothing heavy is imported until a node runs."""
from __future__ import annotations

from comfy_api.latest import io

from . import CATEGORIES, check_file, empty_folder_note, file_fingerprint, file_options, file_path, host

CATEGORY = CATEGORIES["instantbooth"]
MODEL_FOLDER = "instantbooth"  # models/instantbooth, registered (and created) in nodes/__init__.py

InstantBoothType = io.Custom("BOOTHKIT_INSTANTBOOTH")
ConceptType = io.Custom("BOOTHKIT_INSTANTBOOTH_CONCEPT")
INSTANTBOOTH_TIP = "The loaded InstantBooth file (from Load InstantBooth)."
CONCEPT_TIP = "The subject's concept (from InstantBooth Encode Concept)."


class LoadInstantBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitLoadInstantBooth",
            display_name="Load InstantBooth",
            category=CATEGORY,
            description="Loads an InstantBooth file (concept encoder, patch encoder and adapters) from "
                        "models/instantbooth and checks its metadata (and, with a model connected, that it was made "
                        "for that model's family)." + empty_folder_note(MODEL_FOLDER, "train one with `boothkit train "
                                                                        "instantbooth`"),
            inputs=[
                io.Combo.Input("instantbooth_name", options=file_options(MODEL_FOLDER),
                               tooltip="An InstantBooth .safetensors file in models/instantbooth."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the model it will patch, to reject a file made for another base "
                                       "model right away."),
            ],
            outputs=[InstantBoothType.Output(display_name="instantbooth",
                                             tooltip="The InstantBooth encoders and adapters, checked.")],
        )

    @classmethod
    def validate_inputs(cls, instantbooth_name) -> bool | str:
        return check_file(MODEL_FOLDER, instantbooth_name, "InstantBooth")

    @classmethod
    def fingerprint_inputs(cls, instantbooth_name, model=None):
        return file_fingerprint(MODEL_FOLDER, instantbooth_name)

    @classmethod
    def execute(cls, instantbooth_name, model=None) -> io.NodeOutput:
        from ..backend.instantbooth import load_instantbooth

        ib_host = host("instantbooth")
        path = file_path(MODEL_FOLDER, instantbooth_name)
        family, width = ib_host.check_family_for_load(model) if model is not None else (None, None)
        instantbooth = load_instantbooth(path, family=family, ctx_dim=width).eval().requires_grad_(False)
        return io.NodeOutput(ib_host.BoothModel(instantbooth, instantbooth_name))


class InstantBoothEncodeConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitInstantBoothEncodeConcept",
            display_name="InstantBooth Encode Concept",
            category=CATEGORY,
            description="Encodes N photos of one subject into a concept: crops each photo to its mask, fills the "
                        "background, runs CLIP vision, then the concept and patch encoders.",
            inputs=[
                InstantBoothType.Input("instantbooth", tooltip=INSTANTBOOTH_TIP),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the InstantBooth file was trained "
                                                           "with (ViT-L/14 for the published setup)."),
                io.Image.Input("images", tooltip="Photos of the subject; a batch of N images gives one concept."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional: 1 on the subject, one per image (or one for all). Without it whole "
                                      "images are used. LoadImage's alpha mask is 1 on the transparent part: invert "
                                      "it first."),
            ],
            outputs=[ConceptType.Output(display_name="concept",
                                        tooltip="The concept: its token f_c and patch features f_p, with the "
                                                "file's identifier and defaults.")],
        )

    @classmethod
    def execute(cls, instantbooth, clip_vision, images, masks=None) -> io.NodeOutput:
        return io.NodeOutput(host("instantbooth").encode_concept(instantbooth, clip_vision, images, masks))


class InstantBoothApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitInstantBoothApply",
            display_name="InstantBooth Apply",
            category=CATEGORY,
            description="Adds the concept's adapters to every transformer block of a copy of the model (between "
                        "self- and cross-attention). The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a copy is patched; this one is unchanged)."),
                ConceptType.Input("concept", tooltip=CONCEPT_TIP),
                io.Float.Input("beta", default=0.0, min=0.0, max=2.0, step=0.01,
                               tooltip="β, the adapters' weight; 0 = the file's β (its trainer writes the value it "
                                       "was chosen at; the paper's is 0.3, the toy file's 1.5). Lower keeps more of "
                                       "the prompt, higher more of the subject."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the adapters start. A file records the value it "
                                       "was chosen at, which `boothkit generate` uses (the toy file's: 0.2, as in "
                                       "the toy templates); here it is what you set."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the adapters stop."),
                io.String.Input("skip_levels", default="",
                                tooltip="Resolution levels without adapters, comma-separated (0 = full latent "
                                        "resolution, the most expensive; empty = none)."),
                io.String.Input("skip_blocks", default="",
                                tooltip="Single transformer blocks without adapters, by index in execution order, "
                                        "comma-separated (empty = none)."),
            ],
            outputs=[io.Model.Output(tooltip="A copy of the model with the concept's adapters.")],
        )

    @classmethod
    def execute(cls, model, concept, beta, start_percent, end_percent, skip_levels="", skip_blocks=""
                ) -> io.NodeOutput:
        return io.NodeOutput(host("instantbooth").apply(model, concept, beta, start_percent, end_percent, skip_levels,
                                                        skip_blocks))


class InstantBoothCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitInstantBoothCondition",
            display_name="InstantBooth Condition",
            category=CATEGORY,
            description="Replaces the identifier's rows of an encoded prompt by α·f_c, the concept token.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The encoded prompt (e.g. from CLIPTextEncode)."),
                io.Clip.Input("clip", tooltip="The CLIP that encoded the prompt (its tokenizer finds the rows)."),
                ConceptType.Input("concept", tooltip=CONCEPT_TIP),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt that was encoded into the conditioning, with the identifier in it. "
                                        "Tip: convert it to an input and share one text with CLIPTextEncode."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=2.0, step=0.01,
                               tooltip="α, the concept token's scale; 0 = the file's α (the paper's is 0.4)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The prompt with the concept token in the identifier's rows.")],
        )

    @classmethod
    def execute(cls, conditioning, clip, concept, text, alpha) -> io.NodeOutput:
        return io.NodeOutput(host("instantbooth").condition(conditioning, clip, text, concept, alpha))


class InstantBoothTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitInstantBoothTextEncode",
            display_name="InstantBooth Text Encode",
            category=CATEGORY,
            description="CLIPTextEncode and InstantBooth Condition in one: encodes the prompt (inserting the "
                        "identifier before the class noun if it is missing) and puts in the concept token.",
            inputs=[
                io.Clip.Input("clip", tooltip="The model's CLIP (text encoder and tokenizer)."),
                ConceptType.Input("concept", tooltip=CONCEPT_TIP),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="a photo of a person",
                                tooltip="The prompt."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=2.0, step=0.01,
                               tooltip="α, the concept token's scale; 0 = the file's α (the paper's is 0.4)."),
                io.Boolean.Input("insert_identifier", default=True,
                                 tooltip="Insert the identifier before the first class noun when the prompt lacks it."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The prompt with the concept token in the identifier's rows.")],
        )

    @classmethod
    def execute(cls, clip, concept, text, alpha, insert_identifier=True) -> io.NodeOutput:
        return io.NodeOutput(host("instantbooth").encode_text(clip, text, concept, alpha, insert_identifier))


class InstantBoothRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitInstantBoothRegion",
            display_name="InstantBooth Region",
            category=CATEGORY,
            description="Several concepts in one image: limits a concept to a region (a mask and/or a box) and can "
                        "give it its own identifier. Chain one InstantBooth Apply per concept on the same model: each "
                        "concept's adapter term is multiplied by its region at every transformer block's resolution, "
                        "so nothing is added outside it; put each concept's token in at its identifier (one "
                        "Condition / Text Encode per concept, or one masked prompt per region with "
                        "ConditioningSetMask).",
            inputs=[
                ConceptType.Input("concept", tooltip=CONCEPT_TIP),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: the region, 1 inside (soft values weigh the adapters); one mask, "
                                      "stretched to the image. LoadImage's alpha mask is 1 on the transparent part: "
                                      "invert it first. An empty mask turns the concept's adapters off."),
                io.Float.Input("x0", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The box's left edge, a fraction of the image width (the box multiplies the "
                                       "mask; 0, 0, 1, 1 = the whole image)."),
                io.Float.Input("y0", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The box's top edge, a fraction of the image height."),
                io.Float.Input("x1", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The box's right edge, a fraction of the image width."),
                io.Float.Input("y1", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The box's bottom edge, a fraction of the image height."),
                io.String.Input("identifier", default="",
                                tooltip="The word the concept token goes in at, one token of the model's "
                                        "tokenizer (a second subject: ohwx on SD1.5, zwx in the toy world, whose "
                                        "rare words are sks, zwx, vvk); empty = the file's identifier."),
            ],
            outputs=[ConceptType.Output(display_name="concept",
                                        tooltip="The concept with its region and identifier, for InstantBooth Apply "
                                                "and Condition / Text Encode.")],
        )

    @classmethod
    def execute(cls, concept, x0, y0, x1, y1, identifier="", mask=None) -> io.NodeOutput:
        return io.NodeOutput(host("instantbooth").with_region(concept, mask, (x0, y0, x1, y1), identifier))


class InstantBoothInsertIdentifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitInstantBoothInsertIdentifier",
            display_name="InstantBooth Insert Identifier",
            category=CATEGORY,
            description="Inserts the concept's identifier before the first class noun: 'a photo of a person' -> "
                        "'a photo of a sks person'. A prompt that has it already is unchanged.",
            inputs=[
                ConceptType.Input("concept", tooltip=CONCEPT_TIP),
                io.String.Input("text", multiline=True, default="a photo of a person",
                                tooltip="The prompt; the identifier is inserted before its first class noun."),
            ],
            outputs=[io.String.Output(display_name="text", tooltip="The prompt with the identifier in it.")],
        )

    @classmethod
    def execute(cls, concept, text) -> io.NodeOutput:
        return io.NodeOutput(host("instantbooth").with_identifier(text, concept))


NODES = [
    LoadInstantBooth,
    InstantBoothEncodeConcept,
    InstantBoothApply,
    InstantBoothCondition,
    InstantBoothTextEncode,
    InstantBoothInsertIdentifier,
    InstantBoothRegion,
]
