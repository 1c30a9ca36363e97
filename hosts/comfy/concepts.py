"""Tuned concepts as ComfyUI hooks (issue #29, several concepts in one image): a LoRA (Quick-Tune Concept, E4T Tune's
stock export) or an E4T concept becomes a HOOKS group of one ``WeightHook`` (``comfy.hooks.create_hook_lora``, what
the stock Create Hook LoRA node makes from a file). ComfyUI's own Cond Set Props / ConditioningSetProperties then
ties the hooks to one prompt with its mask: the sampler runs the denoiser with that prompt's weights for that prompt
only and blends the predictions by the masks."""
from __future__ import annotations

from . import common


def concept_hooks(lora=None, e4t_concept=None, model=None, strength: float = 1.0, prev_hooks=None):
    """HOOKS with the concept's weight patches on the model (none on the CLIP: the embedding comes with the concept's
    CLIP output). ``model``: needed for an E4T concept (its diffs are of that model's weights); with a LoRA it checks
    that every layer maps onto the model (a hook drops unmapped keys silently)."""
    import comfy.hooks
    import comfy.lora

    if (lora is None) == (e4t_concept is None):
        raise ValueError("Concept Hook takes one concept: connect either lora (Quick-Tune Concept, E4T Tune) or "
                         "e4t_concept (E4T Tune's concept)")
    if e4t_concept is not None:
        if model is None:
            raise ValueError("an E4T concept's weight changes are computed on the model's weights: connect model "
                             "(the one the concept was tuned on)")
        from . import e4t

        tensors = dict(e4t.concept_weight_diffs(model, e4t_concept).tensors)
    else:
        tensors = dict(lora)
        if model is not None:
            key_map = comfy.lora.model_lora_keys_unet(model.model, {})
            unmapped = sorted(layer for layer in common.lora_layers(tensors) if layer not in key_map)
            if unmapped:
                raise ValueError(f"{len(unmapped)} LoRA layer(s) do not map onto this model: {unmapped[:3]}")
    hooks = comfy.hooks.create_hook_lora(tensors, strength_model=float(strength), strength_clip=0.0)
    return hooks if prev_hooks is None else prev_hooks.clone_and_combine(hooks)
