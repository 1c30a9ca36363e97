"""Nodes for tuned concepts used together (issue #29, several concepts in one image): Concept Hook turns a concept's
LoRA or E4T concept into ComfyUI HOOKS for the stock hook nodes (Cond Set Props). Thin: the work is in
hosts/comfy/concepts.py. Nothing heavy is imported until a node runs."""
from __future__ import annotations

from comfy_api.latest import io

from . import CATEGORIES, host
from .e4t import E4TConceptType
from .quicktune import LoRAType


class ConceptHook(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BoothKitConceptHook",
            display_name="Concept Hook",
            category=CATEGORIES["concepts"],
            description="Several tuned concepts in one image: turns a concept's LoRA (Quick-Tune Concept, E4T Tune) "
                        "or E4T concept into HOOKS, as Create Hook LoRA does for a file. Give the hooks and the "
                        "region's mask to ComfyUI's Cond Set Props with that concept's prompt (encoded by the "
                        "concept's CLIP, which carries its embedding), then Conditioning Combine the regions: each "
                        "prompt is denoised with its own concept's weights and the predictions are blended by the "
                        "masks.",
            inputs=[
                LoRAType.Input("lora", optional=True,
                               tooltip="The concept's LoRA (Quick-Tune Concept's or E4T Tune's lora); or connect "
                                       "e4t_concept instead."),
                E4TConceptType.Input("e4t_concept", optional=True,
                                     tooltip="E4T Tune's or Load E4T Concept's concept (its offsets become weight "
                                             "changes of model); or connect lora instead."),
                io.Model.Input("model", optional=True,
                               tooltip="The base model the hooks go on: needed with e4t_concept; with a lora it "
                                       "checks that every layer maps onto it."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="The weight changes' strength (1: as tuned)."),
                io.Hooks.Input("prev_hooks", optional=True, tooltip="Optional: hooks to combine these with."),
            ],
            outputs=[io.Hooks.Output(display_name="hooks",
                                     tooltip="The concept's weight patches as a hook, for Cond Set Props.")],
        )

    @classmethod
    def execute(cls, strength, lora=None, e4t_concept=None, model=None, prev_hooks=None) -> io.NodeOutput:
        return io.NodeOutput(host("concepts").concept_hooks(lora, e4t_concept, model, strength, prev_hooks))


NODES = [ConceptHook]
