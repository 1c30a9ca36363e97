"""The in-process half of the real-ComfyUI E4T tests: run with ComfyUI's python (test_e4t_real.py starts it).

    python e4t_driver.py --comfyui COMFYUI_PATH --pack CUSTOM_NODES/boothkit --models MODELS --work DIR --out OUT

Loads the pack with ComfyUI's own loader, writes a random E4T file for the test checkpoint and CLIP vision model
(sized from ComfyUI's own UNet), runs Load E4T, E4T Tune and Save Concept as ComfyUI's executor runs nodes (inside
torch.inference_mode()), then stock LoraLoader and CLIPTextEncode on what was saved, and a Cancel after step 1; writes
OUT/results.json and OUT/tensors.safetensors. Tiny settings: a 64x64 photo, 2 steps."""
from __future__ import annotations

import dataclasses
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench", "comfy_support")  # node_runner, make_models
sys.path[:0] = [HERE, SUPPORT]
IDENTIFIER, CLASS_NOUN, NAME = "sks", "cat", "e4t_cat"
PROMPT = f"a photo of {IDENTIFIER} {CLASS_NOUN} on the beach"
STEPS = 2
E4T_FILE = "e4t_random.safetensors"


def main(argv=None) -> int:
    from make_models import CHECKPOINT, CLIP_VISION, random_e4t
    from node_runner import (add_model_folders, error_of, instance_forwards, node_runner, pack_modules,
                             saved_for_backward, start, stock_lora_loader, token_table, unet_state, work_folders,
                             write_results)

    a, pack, loaded, log = start(argv, "e4t")
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    import nodes
    import torch

    run = node_runner()
    results, tensors = {}, {}
    results["pack_loaded"] = loaded
    host, qh, backend, formats = pack_modules(pack, "hosts.comfy.e4t", "hosts.comfy.common", "backend.e4t",
                                              "backend.e4t")
    add_model_folders(a.models)
    work_folders(a.work, ("e4t", "embeddings", "loras", "e4t_concepts"))



    results["schemas"] = {k: {"inputs": v.INPUT_TYPES(), "outputs": list(v.RETURN_TYPES)}
                          for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k in ("BoothKitLoadE4T", "BoothKitE4TTune")}
    model, clip, vae = run("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)[:3]
    (clip_vision,) = run("CLIPVisionLoader", clip_name=CLIP_VISION)
    dm = model.get_model_object("diffusion_model")
    token_layer = clip.cond_stage_model.clip_l.transformer.get_input_embeddings()

    # ---- a random E4T file for this checkpoint, sized from ComfyUI's own UNet -----------------------------------------
    with torch.inference_mode(False):
        e4t, modules = random_e4t(model, clip_vision, host, backend, pretrained=0.01, class_word=CLASS_NOUN,
                                  hidden=32, tune_lr=1e-2, modulation_rank=2)
        config, targets = e4t.config, e4t.config.targets
        formats.save_e4t(os.path.join(a.work, "e4t", E4T_FILE), e4t)
        to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    results["num_targets"], results["unet_dims"] = len(targets), config.unet_dims
    results["num_attention"] = len(backend.attention_targets(targets))
    log("E4T file written")



    def untouched_report(before):
        sd = unet_state(model)
        return {"unet_state_identical": all(torch.equal(sd[k], v) for k, v in before["sd"].items()),
                "model_patches_identical": model.patches == before["model_patches"],
                "clip_patches_identical": clip.patcher.patches == before["clip_patches"],
                "token_table_identical": bool(torch.equal(token_table(clip, token_layer), before["tokens"])),
                "forward_hooks_left": sum(len(m._forward_hooks) for m in dm.modules())}

    before = {"sd": unet_state(model), "model_patches": {k: list(v) for k, v in model.patches.items()},
              "clip_patches": dict(clip.patcher.patches), "tokens": token_table(clip, token_layer)}

    # ---- Load E4T, E4T Tune ------------------------------------------------------------------------------------------
    (loaded,) = run("BoothKitLoadE4T", e4t_name=E4T_FILE)
    results["listed"] = folder_paths.get_filename_list("e4t")
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    blob = ((xx ** 2 + yy ** 2) < 0.4).float()[..., None]
    image = (blob * torch.tensor([0.9, 0.5, 0.1]) + (1 - blob) * torch.rand(3, generator=gen))[None].clamp(0, 1)
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append(value))
    args = dict(e4t=loaded, model=model, clip=clip, clip_vision=clip_vision, vae=vae, image=image, steps=STEPS,
                learning_rate=0.0, identifier=IDENTIFIER, class_noun=CLASS_NOUN, resolution=64, seed=0)
    e_model, e_clip, embedding, lora, report, concept = run("BoothKitE4TTune", **args)
    comfy.utils.set_progress_bar_global_hook(None)
    results["report"], results["progress"] = report, progress
    results["embedding"] = {"keys": sorted(embedding.vectors), "shape": list(embedding.vectors["emb_params"].shape),
                            "identifier": embedding.identifier}
    results["lora"] = {"num": len(lora.tensors), "all_diff": all(k.endswith(".diff") for k in lora.tensors),
                       "method": lora.metadata.get("method")}
    results["untouched_after_run"] = untouched_report(before)
    log("E4T tune done")

    sd_e = unet_state(e_model)
    changed = sorted(k for k in sd_e if not torch.equal(sd_e[k], before["sd"][k]))
    expected = sorted(to_ldm[f"{t}.weight"].replace("diffusion_model.", "", 1) if to_ldm[f"{t}.weight"].startswith(
        "diffusion_model.") else to_ldm[f"{t}.weight"] for t in targets)
    results["changed_are_targets"] = changed == expected
    results["num_changed"] = len(changed)
    ident_id = clip.tokenize(IDENTIFIER, return_word_ids=True)["l"][0][1][0]
    table = token_table(e_clip, token_layer)
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[ident_id] = False
    results["clip_rows"] = {"others_identical": bool(torch.equal(table[others], before["tokens"][others])),
                            "identifier_is_embedding": bool(torch.equal(table[ident_id].float(),
                                                                        embedding.vectors["emb_params"][0])),
                            "table_dtype": str(table.dtype),
                            "max_diff": float((table[ident_id].float() - embedding.vectors["emb_params"][0]).abs().max())}

    # ---- Save Concept, stock LoraLoader and embedding:name -----------------------------------------------------------
    (paths,) = run("BoothKitSaveConcept", embedding=embedding, lora=lora, name=NAME, overwrite=False)
    results["saved"] = paths.splitlines()
    lora_model, _, results["lora_loader_warnings"] = stock_lora_loader(run, model, clip, f"{NAME}_lora.safetensors")
    sd_l = unet_state(lora_model)
    # the stock export is fp16: the same weights up to fp16 rounding of the diffs
    results["lora_dtypes"] = sorted({str(v.dtype) for v in lora.tensors.values()})
    results["lora_loader_max_diff"] = max(float((sd_l[k].float() - sd_e[k].float()).abs().max()) for k in sd_e)
    results["max_weight_change"] = max(float((sd_e[k] - before["sd"][k]).abs().max()) for k in changed) if changed \
        else 0.0

    # ---- the compact E4T concept: Save Concept's default for E4T, Load E4T Concept gives E4T Tune's weights back -----
    (concept_paths,) = run("BoothKitSaveConcept", e4t_concept=concept, name=NAME, overwrite=False)
    concept_path = concept_paths.splitlines()[0]
    c_model, c_clip, c_report, c_concept = run("BoothKitLoadE4TConcept", concept_name=os.path.basename(concept_path),
                                               model=model, clip=clip)
    # the loaded concept as a hook (Concept Hook, issue #29): the same weight diffs as E4T Tune's concept
    with torch.inference_mode(False):
        hook_tune = host.concept_weight_diffs(model, concept).tensors
        hook_loaded = host.concept_weight_diffs(model, c_concept).tensors
    sd_c = unet_state(c_model)
    results["concept"] = {
        "file": os.path.basename(concept_path), "bytes": os.path.getsize(concept_path),
        "stock_bytes": os.path.getsize(os.path.join(a.work, "loras", f"{NAME}_lora.safetensors")),
        "listed": folder_paths.get_filename_list("e4t_concepts"), "report": c_report,
        "weights_equal_tune": all(torch.equal(sd_c[k], sd_e[k]) for k in sd_e),
        "hook_diffs_equal_tune": sorted(hook_loaded) == sorted(hook_tune) and all(
            torch.equal(hook_loaded[k], hook_tune[k]) for k in hook_tune),
        "save_loaded_error": error_of(lambda: run("BoothKitSaveConcept", e4t_concept=c_concept, name=NAME + "_again",
                                                  overwrite=False)),
        "weights_differing": sorted(k for k in sd_e if not torch.equal(sd_c[k], sd_e[k]))[:5],
        "weights_max_diff": max(float((sd_c[k].float() - sd_e[k].float()).abs().max()) for k in sd_e),
        "token_table_equal_tune": bool(torch.equal(token_table(c_clip, token_layer), token_table(e_clip, token_layer))),
        "token_max_diff": float((token_table(c_clip, token_layer).float()
                                 - token_table(e_clip, token_layer).float()).abs().max()),
        "again_without_overwrite": error_of(lambda: run("BoothKitSaveConcept", e4t_concept=concept, name=NAME,
                                                        overwrite=False)),
    }
    results["untouched_after_concept"] = untouched_report(before)
    (cond_e,) = run("CLIPTextEncode", clip=e_clip, text=PROMPT)
    (cond_emb,) = run("CLIPTextEncode", clip=clip, text=PROMPT.replace(IDENTIFIER, f"embedding:{NAME}"))
    (cond_plain,) = run("CLIPTextEncode", clip=clip, text=PROMPT)
    tensors.update(cond_e=cond_e[0][0], cond_emb=cond_emb[0][0], cond_plain=cond_plain[0][0])

    # ---- a file with tune_flip on and tune_cross_kv off: the mirror image is drawn, the cross-attention keys' and
    # values' offsets keep their pre-trained values ----------------------------------------------------------------------
    # (without the photo's output-channel scales, which are in every layer's diff, the kept ones included)
    with torch.inference_mode(False):
        flip = backend.E4T(dataclasses.replace(config, tune_flip=True, tune_cross_kv=False, modulation_rank=0))
        flip.load_state_dict({k: v for k, v in e4t.state_dict().items() if k in flip.state_dict()})
        formats.save_e4t(os.path.join(a.work, "e4t", "e4t_flip.safetensors"), flip)
    (flip_e4t,) = run("BoothKitLoadE4T", e4t_name="e4t_flip.safetensors")
    drawn, encoded, real_objective, real_encode = [], [], backend.objective, qh.encode_images

    def spy(e, batch, *args_, **kw):
        x = batch.x0
        drawn.append([bool(not torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])), len(x) == 4])
        return real_objective(e, batch, *args_, **kw)

    def spy_encode(vae_, model_, pixels, *args_, **kw):
        encoded.append(len(pixels) == 2 and bool(torch.equal(pixels[1], pixels[0].flip(-1))))
        return real_encode(vae_, model_, pixels, *args_, **kw)

    backend.objective, qh.encode_images = spy, spy_encode
    try:
        # the blob moved to the left: the main run's centred blob is its own mirror image
        left = torch.roll(image, -16, dims=2)
        *_, flip_lora, flip_report, _ = run("BoothKitE4TTune", **{**args, "e4t": flip_e4t, "image": left})
    finally:
        backend.objective, qh.encode_images = real_objective, real_encode
    with torch.inference_mode(False), torch.no_grad():
        pre = backend.weight_diff_file(flip_e4t.offsets, {t: modules[t].weight for t in targets}, "sd1", IDENTIFIER,
                                       "sd1").tensors
    kv = [k for k in pre if k.endswith(("attn2_to_k.diff", "attn2_to_v.diff"))]
    results["flip"] = {"report": flip_report, "draws": drawn, "encoded_mirror": encoded, "kv": len(kv),
                       "kv_kept": all(torch.equal(flip_lora.tensors[k], pre[k].half()) for k in kv),
                       "others_moved": all(not torch.equal(flip_lora.tensors[k], pre[k].half()) for k in pre
                                           if k not in kv)}
    results["untouched_after_flip"] = untouched_report(before)

    # ---- Cancel: in the first preparation phase, and after step 1 (the 4 phases are the bar's first 4 ticks) -----------
    phases = len(host.Progress.PHASES)
    for where, at in (("phase", 1), ("step", phases + 1)):
        seen = []

        def hook(value, total, preview, node_id=None):
            seen.append(value)
            if value == at:
                mm.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(hook)
        results[f"cancel_{where}_error"] = error_of(lambda: run("BoothKitE4TTune", **{**args, "steps": 5}))
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
        results[f"cancel_{where}_progress"] = seen
    results["phases"] = phases
    results["untouched_at_end"] = untouched_report(before)
    results["errors"] = {
        "class_multi_token": error_of(lambda: run("BoothKitE4TTune", **{**args, "class_noun": "orange cat"})),
        "missing_file": error_of(lambda: run("BoothKitLoadE4T", e4t_name="nope.safetensors")),
        # the shipped toy file on an SD1.5 model: refused at Load E4T, naming the file
        "toy_file_on_sd15": error_of(lambda: run("BoothKitLoadE4T", e4t_name="toy_e4t.safetensors", model=model)),
    }

    # ---- gradient checkpointing: the same tune, less held for the backward pass, the layers' forwards put back -------
    kw = dict(image=image, class_noun=CLASS_NOUN, steps=STEPS, resolution=64, seed=0)
    forwards_before = instance_forwards(dm)
    runs = {}
    for on in (False, True):
        with torch.inference_mode(), saved_for_backward() as saved:
            out = host.e4t_tune(model, clip, clip_vision, vae, loaded, **kw, gradient_checkpointing=on)
        runs[on] = (out, saved[0])
    (plain, plain_saved), (ckpt, ckpt_saved) = runs[False], runs[True]
    results["checkpointing"] = {
        "losses": plain.result.losses, "losses_checkpointed": ckpt.result.losses,
        "diffs_max_abs": max(float((plain.lora.tensors[k].float() - ckpt.lora.tensors[k].float()).abs().max())
                             for k in plain.lora.tensors),
        "diffs_scale": max(float(v.float().abs().max()) for v in plain.lora.tensors.values()),
        "saved_bytes": plain_saved, "saved_bytes_checkpointed": ckpt_saved,
        "recorded": ckpt.embedding.metadata.get("training", ""),
        "forwards_before": forwards_before, "forwards_after": instance_forwards(dm)}
    results["untouched_after_checkpointing"] = untouched_report(before)
    log("checkpointed tune done")

    # ---- a LoRA loaded before E4T Tune, the model loaded in low-VRAM mode -----------------------------------------------
    # Partially loaded, ComfyUI leaves each layer's stored weight without the LoRA and applies it in the layer's
    # forward (weight functions). The tune must see the same weights as with the model fully loaded: the same losses
    # and the same weight diffs. On a CPU ComfyUI always loads fully, so the partial load is made here and
    # load_models_gpu kept from undoing it. The partial run is also gradient-checkpointed, as the node runs by default
    # on a small card: its recomputation must read the weights through the weight functions again.
    lora_model = stock_lora_loader(run, model, clip, f"{NAME}_lora.safetensors")[0]
    with torch.inference_mode():
        full = host.e4t_tune(lora_model, clip, clip_vision, vae, loaded, **kw)
        mm.unload_all_models()
        lora_model.patch_model(torch.device("cpu"), lowvram_model_memory=1)
        patched = sum(bool(getattr(m, "weight_function", [])) for m in modules.values())
        load = mm.load_models_gpu
        mm.load_models_gpu = lambda models, *a_, **k_: load([m for m in models if m is not lora_model], *a_, **k_)
        try:
            low = host.e4t_tune(lora_model, clip, clip_vision, vae, loaded, **kw, gradient_checkpointing=True)
        finally:
            mm.load_models_gpu = load
            lora_model.unpatch_model()
            mm.unload_all_models()
    results["lowvram"] = {
        "targets_with_weight_functions": patched, "num_targets": len(modules),
        "losses_full": full.result.losses, "losses_low": low.result.losses,
        "diffs_max_abs": max(float((full.lora.tensors[k].float() - low.lora.tensors[k].float()).abs().max())
                             for k in full.lora.tensors),
        "diffs_scale": max(float(v.float().abs().max()) for v in full.lora.tensors.values()),
        "weight_functions_left": sum(len(getattr(m, "weight_function", [])) for m in modules.values())}
    log("low-VRAM tune done")
    results["t_total"] = log.elapsed()

    write_results(a.out, results, tensors)
    return 0


if __name__ == "__main__":
    from node_runner import run_main

    run_main(main)
