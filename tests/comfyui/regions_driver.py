"""The in-process half of the real-ComfyUI tests of several concepts in one image (issue #29): run with ComfyUI's
python (test_regions_real.py starts it).

    python regions_driver.py --comfyui COMFYUI_PATH --pack CUSTOM_NODES/boothkit --models MODELS --work DIR --out OUT

On the toy world (Toy World Loader, 32 high x 64 wide, 4 DDIM steps), as ComfyUI's executor runs the nodes:
InstantBooth Region + two chained InstantBooth Apply nodes (the sampled latent with an empty region, a whole-image
region, and what the first transformer block holds after the patches: a spy middle_patch appended after them), then
two quick-tuned concepts as hooks (Concept Hook -> Cond Set Props with a mask -> ConditioningCombine) against each
concept's own MODEL. Writes OUT/results.json and OUT/tensors.safetensors."""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench", "comfy_support")  # node_runner, make_models
sys.path[:0] = [HERE, SUPPORT]
CAT, ROBOT = 1003, 1020  # held-out subjects: a cat and a robot
H, W = 32, 64


def main(argv=None) -> int:
    from node_runner import node_runner, start, work_folders, write_results

    a, pack, loaded, log = start(argv, "regions")
    import asyncio

    import nodes
    import torch

    extras = os.path.join(a.comfyui, "comfy_extras")
    for name in ("nodes_hooks.py", "nodes_chroma_radiance.py"):  # Cond Set Props; the toy world's empty latent
        assert asyncio.run(nodes.load_custom_node(os.path.join(extras, name), module_parent="comfy_extras")), name

    run = node_runner()
    work_folders(a.work, ("embeddings", "loras"))
    results, tensors = {"pack_loaded": loaded}, {}
    model, clip, vae, clip_vision = run("BoothKitToyWorldLoader")
    photos = {k: run("BoothKitToySubjectPhotos", identity=i, count=2, seed=0) for k, i in (("cat", CAT),
                                                                                           ("robot", ROBOT))}
    (booth,) = run("BoothKitLoadInstantBooth", instantbooth_name="toy_instantbooth.safetensors")
    concept = {k: run("BoothKitInstantBoothEncodeConcept", instantbooth=booth, clip_vision=clip_vision, images=v[0],
                      masks=v[1])[0] for k, v in photos.items()}
    left = torch.zeros(1, H, W)
    left[:, :, : W // 2] = 1
    right = 1 - left
    negative = run("CLIPTextEncode", clip=clip, text="")[0]
    (latent,) = run("EmptyChromaRadianceLatentImage", width=W, height=H, batch_size=1)
    log("loaded")

    def region(c, mask, identifier=""):
        return run("BoothKitInstantBoothRegion", concept=c, mask=mask, x0=0.0, y0=0.0, x1=1.0, y1=1.0,
                   identifier=identifier)[0]

    def apply(m, c):
        return run("BoothKitInstantBoothApply", model=m, concept=c, beta=0.0, start_percent=0.0, end_percent=1.0,
                   skip_levels="", skip_blocks="")[0]

    def sample(m, positive, steps=4, cfg=3.0):
        out = run("KSampler", model=m, seed=7, steps=steps, cfg=cfg, sampler_name="ddim", scheduler="simple",
                  positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]
        return out["samples"].float().clone()

    def first_block(m):
        """What the first transformer block holds after the middle_patches, at the first step (a spy appended)."""
        seen = []

        def spy(x, extra_options):
            if not seen:
                seen.append(x.detach().float().clone())
            return x
        m = m.clone()
        m.set_model_patch(spy, "middle_patch")
        sample(m, prompt, steps=1)
        return seen[0]

    prompt = run("BoothKitInstantBoothTextEncode", clip=clip, concept=concept["cat"],
                 text="a photo of a sks cat on grass at day", alpha=0.0, insert_identifier=True)[0]
    cat_whole = apply(model, concept["cat"])
    tensors["base"] = sample(model, prompt)
    tensors["cat_whole"] = sample(cat_whole, prompt)
    tensors["cat_region_ones"] = sample(apply(model, region(concept["cat"], torch.ones(1, H, W))), prompt)
    tensors["cat_region_empty"] = sample(apply(model, region(concept["cat"], torch.zeros(1, H, W))), prompt)
    cat_left = apply(model, region(concept["cat"], left))
    both = apply(cat_left, region(concept["robot"], right, "zwx"))
    results["patches"] = {name: len(m.model_options["transformer_options"]["patches"]["middle_patch"])
                          for name, m in (("cat_left", cat_left), ("both", both))}
    for name, m in (("base", model), ("cat_left", cat_left), ("both", both)):
        tensors[f"block0_{name}"] = first_block(m)
    log("instantbooth")

    # the concept tokens at their identifiers, one prompt per region (ConditioningSetMask), as the toy template
    cat_prompt = run("BoothKitInstantBoothTextEncode", clip=clip, concept=region(concept["cat"], left),
                     text="a photo of a sks cat on grass at day", alpha=0.0, insert_identifier=True)[0]
    robot_prompt = run("BoothKitInstantBoothTextEncode", clip=clip, concept=region(concept["robot"], right, "zwx"),
                       text="a photo of a zwx robot on grass at day", alpha=0.0, insert_identifier=True)[0]
    masked = run("ConditioningCombine",
                 conditioning_1=run("ConditioningSetMask", conditioning=cat_prompt, mask=left, strength=1.0,
                                    set_cond_area="default")[0],
                 conditioning_2=run("ConditioningSetMask", conditioning=robot_prompt, mask=right, strength=1.0,
                                    set_cond_area="default")[0])[0]
    tensors["two_subjects"] = sample(both, masked, steps=20)
    log("two subjects")

    # ---- tuned concepts as hooks ---------------------------------------------------------------------------------
    tuned = {}
    for k, ident in (("cat", "sks"), ("robot", "zwx")):
        out = run("BoothKitQuickTuneConcept", model=model, clip=clip, vae=vae, images=photos[k][0], identifier=ident,
                  class_noun=k, init_word="", embedding_steps=2, embedding_lr=0.01, denoiser_steps=3,
                  denoiser_lr=0.01, lora_rank=4, resolution=32, seed=0, gradient_checkpointing=False)
        m_k, clip_k, _, lora_k = out[:4]
        text = f"a photo of a {ident} {k} on grass at day"
        tuned[k] = {"model": m_k, "lora": lora_k, "cond": run("CLIPTextEncode", clip=clip_k, text=text)[0]}
    log("tuned")

    def hooked(k, mask):
        (hooks,) = run("BoothKitConceptHook", lora=tuned[k]["lora"], model=model, strength=1.0)
        return run("ConditioningSetProperties", cond_NEW=tuned[k]["cond"], strength=1.0, set_cond_area="default",
                   mask=mask, hooks=hooks)[0]

    def combine(c1, c2):
        return run("ConditioningCombine", conditioning_1=c1, conditioning_2=c2)[0]

    # cfg 1: ComfyUI skips the unconditional pass, so only the hooked prompts are denoised
    tensors["cat_tuned_alone"] = sample(tuned["cat"]["model"], tuned["cat"]["cond"], cfg=1.0)
    tensors["robot_tuned_alone"] = sample(tuned["robot"]["model"], tuned["robot"]["cond"], cfg=1.0)
    tensors["hooks_cat_everywhere"] = sample(model, combine(hooked("cat", torch.ones(1, H, W)),
                                                            hooked("robot", torch.zeros(1, H, W))), cfg=1.0)
    tensors["hooks_left_right"] = sample(model, combine(hooked("cat", left), hooked("robot", right)), cfg=1.0)
    tensors["hooks_left_right_cfg"] = sample(model, combine(hooked("cat", left), hooked("robot", right)), steps=20)
    tensors["base_cat_prompt"] = sample(model, tuned["cat"]["cond"], cfg=1.0)
    # an E4T concept (E4T Tune's concept output, 1 step) as a hook: everywhere == E4T Tune's own MODEL
    (e4t,) = run("BoothKitLoadE4T", e4t_name="toy_e4t.safetensors")
    e4t_out = run("BoothKitE4TTune", e4t=e4t, model=model, clip=clip, clip_vision=clip_vision, vae=vae,
                  image=photos["robot"][0][:1], steps=1, learning_rate=0.0, identifier="vvk", class_noun="robot",
                  resolution=32, seed=0, gradient_checkpointing=False)
    e4t_model, e4t_clip, e4t_concept = e4t_out[0], e4t_out[1], e4t_out[5]
    e4t_cond = run("CLIPTextEncode", clip=e4t_clip, text="a photo of a vvk robot on grass at day")[0]
    (e4t_hooks,) = run("BoothKitConceptHook", e4t_concept=e4t_concept, model=model, strength=1.0)
    tensors["e4t_alone"] = sample(e4t_model, e4t_cond, cfg=1.0)
    tensors["e4t_hook_everywhere"] = sample(model, run("ConditioningSetProperties", cond_NEW=e4t_cond, strength=1.0,
                                                       set_cond_area="default", mask=torch.ones(1, H, W),
                                                       hooks=e4t_hooks)[0], cfg=1.0)
    tensors["base_e4t_prompt"] = sample(model, e4t_cond, cfg=1.0)
    results["hooks_error"] = None
    try:
        run("BoothKitConceptHook", strength=1.0)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        results["hooks_error"] = str(e)
    log("hooks")
    write_results(a.out, results, tensors)
    return 0


if __name__ == "__main__":
    from node_runner import run_main

    run_main(main)
