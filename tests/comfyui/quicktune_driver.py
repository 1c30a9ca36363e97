"""The in-process half of the real-ComfyUI quick-tune tests: run with ComfyUI's python (test_quicktune_real.py starts
it).

    python quicktune_driver.py --comfyui COMFYUI_PATH --pack CUSTOM_NODES/boothkit --models MODELS --work DIR --out OUT

Loads the pack with ComfyUI's own loader, runs Quick-Tune Concept and Save Concept on the random SD1.5 checkpoint as
ComfyUI's executor runs nodes (inside torch.inference_mode(), so the loaded weights are inference tensors), then
stock LoraLoader and CLIPTextEncode on what was saved, a Cancel after step k and a NaN loss, and writes what it saw to
OUT/results.json and OUT/tensors.safetensors. Tiny settings: 64x64 images, 3 + 3 steps."""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench", "comfy_support")  # node_runner, make_models
sys.path[:0] = [HERE, SUPPORT]
IDENTIFIER, CLASS_NOUN, NAME = "sks", "cat", "sks_cat"
PROMPT = f"a photo of {IDENTIFIER} {CLASS_NOUN} on the beach"
STEPS = 3  # per stage


def main(argv=None) -> int:
    from make_models import CHECKPOINT
    from node_runner import (add_model_folders, error_of, instance_forwards, node_runner, pack_modules,
                             saved_for_backward, start, stock_lora_loader, token_table, unet_state, work_folders,
                             write_results)

    a, pack, loaded, log = start(argv, "quicktune")
    import comfy.model_management as mm
    import comfy.utils
    import nodes
    import torch

    run = node_runner()
    results, tensors = {}, {}
    results["pack_loaded"] = loaded
    host, backend_embedding, backend_lora = pack_modules(pack, "hosts.comfy.quicktune", "backend.embedding",
                                                         "backend.lora")
    add_model_folders(a.models, ("checkpoints",))
    emb_dir, lora_dir = work_folders(a.work, ("embeddings", "loras")).values()
    results["schemas"] = {k: {"inputs": v.INPUT_TYPES(), "outputs": list(v.RETURN_TYPES),
                              "output_node": bool(getattr(v, "OUTPUT_NODE", False))}
                          for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                          if k in ("BoothKitQuickTuneConcept", "BoothKitSaveConcept")}



    # ---- the checkpoint, and what must never change --------------------------------------------------------------
    model, clip, vae = run("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)[:3]
    dm = model.get_model_object("diffusion_model")
    token_layer = clip.cond_stage_model.clip_l.transformer.get_input_embeddings()
    results["weights_are_inference_tensors"] = bool(next(dm.parameters()).is_inference())



    def untouched_report(before):
        """Everything of the input MODEL/CLIP that training could have left behind, compared with ``before``."""
        sd = unet_state(model)
        return {
            "unet_state_identical": all(torch.equal(sd[k], v) for k, v in before["sd"].items()),
            "model_patches_identical": model.patches == before["model_patches"],
            "model_options_identical": repr(model.model_options) == before["model_options"],
            "clip_patches_identical": clip.patcher.patches == before["clip_patches"],
            "token_table_identical": bool(torch.equal(token_table(clip, token_layer), before["tokens"])),
            "forward_hooks_left": sum(len(m._forward_hooks) for m in dm.modules()),
            "weight_functions_left": sum(1 for root in (dm, clip.cond_stage_model) for m in root.modules()
                                         if "weight_function" in m.__dict__ and m.weight_function
                                         or "bias_function" in m.__dict__ and m.bias_function),
        }

    before = {"sd": unet_state(model), "model_patches": {k: list(v) for k, v in model.patches.items()},
              "model_options": repr(model.model_options), "clip_patches": dict(clip.patcher.patches),
              "tokens": token_table(clip, token_layer)}

    def flags():
        return [p.requires_grad for root in (dm, clip.cond_stage_model) for p in root.parameters()]

    def run_keeping_flags(label, node_id, **kwargs):
        """run() plus a check that every weight's requires_grad is as before (ComfyUI's own loading resets them, so
        this is compared right around the run)."""
        before_flags = flags()
        try:
            return run(node_id, **kwargs)
        finally:
            results[f"requires_grad_kept_{label}"] = flags() == before_flags
    log("checkpoint loaded")

    # ---- Quick-Tune Concept ----------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    # two 72x64 photos (a blob on a background): not the training size, so they are resized with a note
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 72), torch.linspace(-1, 1, 64), indexing="ij")
    blob = ((xx ** 2 + yy ** 2) < 0.4).float()[..., None]
    images = torch.stack([blob * torch.tensor([0.9, 0.5, 0.1]) + (1 - blob) * torch.rand(3, generator=gen)
                          for _ in range(2)]).clamp(0, 1)
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append(value))
    args = dict(model=model, clip=clip, vae=vae, images=images, identifier=IDENTIFIER, class_noun=CLASS_NOUN,
                init_word="", embedding_steps=STEPS, embedding_lr=5e-3, denoiser_steps=STEPS, denoiser_lr=1e-3,
                lora_rank=4, resolution=64, seed=0)
    t = time.perf_counter()
    qt_model, qt_clip, embedding, lora, report = run_keeping_flags("run", "BoothKitQuickTuneConcept", **args)
    results["t_quick_tune"] = time.perf_counter() - t
    results["report"], results["progress"] = report, list(progress)
    results["embedding"] = {"family": embedding.family, "identifier": embedding.identifier,
                            "init_word": embedding.init_word, "keys": sorted(embedding.vectors),
                            "shape": list(embedding.vectors["emb_params"].shape),
                            "metadata_format": embedding.metadata.get("format")}
    init_id = clip.tokenize(CLASS_NOUN, return_word_ids=True)["l"][0][1][0]
    ident_id = clip.tokenize(IDENTIFIER, return_word_ids=True)["l"][0][1][0]
    results["token_ids"] = {"identifier": ident_id, "init": init_id}
    tensors["vector"] = embedding.vectors["emb_params"]
    tensors["init_row"], tensors["identifier_row"] = before["tokens"][init_id], before["tokens"][ident_id]
    results["lora"] = {"num_tensors": len(lora.tensors), "keys_sample": sorted(lora.tensors)[:3],
                       "metadata": {k: lora.metadata.get(k) for k in ("format", "method", "family", "identifier",
                                                                       "ss_network_dim", "ss_steps")}}
    results["untouched_after_run"] = untouched_report(before)
    log("quick-tune done")

    # ---- the returned MODEL and CLIP: only the LoRA's weights and the identifier's row differ ---------------------
    sd_qt = unet_state(qt_model)
    lora_targets = {k for k in sd_qt if not torch.equal(sd_qt[k], before["sd"][k])}
    results["qt_changed_keys"] = sorted(lora_targets)
    qt_table = token_table(qt_clip, token_layer)
    other_rows = torch.ones(qt_table.shape[0], dtype=torch.bool)
    other_rows[ident_id] = False
    results["qt_clip"] = {
        "other_rows_identical": bool(torch.equal(qt_table[other_rows], before["tokens"][other_rows])),
        "identifier_row_is_vector": bool(torch.equal(qt_table[ident_id].float(),
                                                     embedding.vectors["emb_params"][0])),
        "table_dtype": str(qt_table.dtype),
    }

    # ---- Save Concept, then stock ComfyUI loads both files ---------------------------------------------------------
    (paths,) = run("BoothKitSaveConcept", embedding=embedding, lora=lora, name=NAME, overwrite=False)
    results["saved"] = paths.splitlines()
    results["error_exists"] = error_of(lambda: run("BoothKitSaveConcept", embedding=embedding, lora=lora,
                                                   name=NAME, overwrite=False))
    results["resaved"] = run("BoothKitSaveConcept", embedding=embedding, lora=lora, name=NAME, overwrite=True)[0] \
        .splitlines()
    results["traversal"] = run("BoothKitSaveConcept", embedding=embedding, name="../../outside", overwrite=False)[0]
    results["error_nothing"] = error_of(lambda: run("BoothKitSaveConcept", name="x", overwrite=False))
    results["files"] = {d: sorted(os.listdir(os.path.join(a.work, d))) for d in ("embeddings", "loras")}
    e = backend_embedding.load_embedding(os.path.join(emb_dir, f"{NAME}.safetensors"), family="sd1",
                                         widths={"emb_params": 768})
    results["embedding_file"] = {"identifier": e.identifier, "equal": bool(torch.equal(
        e.vectors["emb_params"], embedding.vectors["emb_params"])), "format": e.metadata.get("format")}
    lf = backend_lora.load_lora(os.path.join(lora_dir, f"{NAME}_lora.safetensors"), family="sd1")
    results["lora_file"] = {"layers": len(lf.lora.pairs), "identifier": lf.identifier}

    lora_model, lora_clip, results["lora_loader_warnings"] = stock_lora_loader(run, model, clip,
                                                                               f"{NAME}_lora.safetensors")
    results["lora_loader_patched_keys"] = len(lora_model.patches)
    sd_lora = unet_state(lora_model)
    results["lora_loader_equals_quick_tune"] = all(torch.equal(sd_lora[k], sd_qt[k]) for k in sd_qt)
    results["lora_loader_changed_keys"] = sorted(k for k in sd_lora if not torch.equal(sd_lora[k], before["sd"][k]))
    results["max_weight_change"] = max(float((sd_lora[k] - before["sd"][k]).abs().max()) for k in lora_targets)

    (cond_qt,) = run("CLIPTextEncode", clip=qt_clip, text=PROMPT)
    (cond_emb,) = run("CLIPTextEncode", clip=clip, text=PROMPT.replace(IDENTIFIER, f"embedding:{NAME}"))
    (cond_plain,) = run("CLIPTextEncode", clip=clip, text=PROMPT)
    tensors.update(cond_qt=cond_qt[0][0], cond_emb=cond_emb[0][0], cond_plain=cond_plain[0][0])
    results["untouched_after_use"] = untouched_report(before)
    log("saved files loaded by stock nodes")

    # ---- Cancel after step k: the exception ComfyUI expects, within one step, nothing left behind ----------------
    for label, k in (("stage1", 1), ("stage2", STEPS + 1)):
        seen = []

        def hook(value, total, preview, node_id=None, k=k, seen=seen):
            seen.append(value)
            if value == k:
                mm.interrupt_current_processing(True)  # what the UI's Cancel button does

        comfy.utils.set_progress_bar_global_hook(hook)
        err = error_of(lambda: run_keeping_flags(label, "BoothKitQuickTuneConcept", **args))
        mm.interrupt_current_processing(False)
        results[f"cancel_{label}"] = {"error": err, "progress": seen, "k": k, **untouched_report(before)}
    comfy.utils.set_progress_bar_global_hook(None)
    log("cancel checked")

    # ---- a NaN loss at stage-2 step 2: stop, keep step 1's LoRA, say so --------------------------------------------
    real_make_predict = host.make_predict

    def nan_on_second_call(m):
        predict, calls = real_make_predict(m), []

        def wrapped(x, t, cond):
            calls.append(1)
            out = predict(x, t, cond)
            return out * float("nan") if len(calls) == 2 else out
        return wrapped

    host.make_predict = nan_on_second_call
    try:
        nan_out = run("BoothKitQuickTuneConcept", **{**args, "embedding_steps": 0})
    finally:
        host.make_predict = real_make_predict
    nan_lora = nan_out[3]
    results["nan"] = {"report": nan_out[4], "steps": nan_lora.metadata.get("ss_steps"),
                      "lora_finite": all(bool(v.isfinite().all()) for v in nan_lora.tensors.values()),
                      "lora_changed": any(bool(v.abs().sum() > 0) for k, v in nan_lora.tensors.items()
                                          if k.endswith("lora_up.weight"))}
    log("nan checked")

    # ---- gradient checkpointing: the same two stages, less held for the backward pass, the forwards put back ---------
    forwards_before, runs = instance_forwards(dm), {}
    kw = {k: v for k, v in args.items() if k not in ("model", "clip", "vae", "images", "class_noun", "lora_rank")}
    for on in (False, True):
        with torch.inference_mode(), saved_for_backward() as saved:
            out = host.quick_tune(model, clip, vae, images, CLASS_NOUN, rank=4, **kw, gradient_checkpointing=on)
        runs[on] = (out, saved[0])
    (plain, plain_saved), (ckpt, ckpt_saved) = runs[False], runs[True]
    results["checkpointing"] = {
        "losses": [plain.stage1.losses, plain.stage2.losses],
        "losses_checkpointed": [ckpt.stage1.losses, ckpt.stage2.losses],
        "vector_max_abs": float((plain.embedding.vectors["emb_params"] - ckpt.embedding.vectors["emb_params"])
                                .abs().max()),
        "lora_max_abs": max(float((plain.lora.tensors[k].float() - ckpt.lora.tensors[k].float()).abs().max())
                            for k in plain.lora.tensors),
        "lora_scale": max(float(v.float().abs().max()) for v in plain.lora.tensors.values()),
        "saved_bytes": plain_saved, "saved_bytes_checkpointed": ckpt_saved,
        "recorded": [plain.lora.metadata.get("ss_gradient_checkpointing"),
                     ckpt.lora.metadata.get("ss_gradient_checkpointing")],
        "forwards_before": forwards_before, "forwards_after": instance_forwards(dm)}
    results["untouched_after_checkpointing"] = untouched_report(before)
    log("checkpointed quick-tune done")

    # ---- bad input gives clear messages -----------------------------------------------------------------------------
    bad = {"zero_images": {"images": images[:0]}, "identifier_multi_token": {"identifier": "qzxvbkw"},
           "init_word_multi_token": {"init_word": "orange cat"}, "identifier_is_class": {"identifier": "cat"},
           "empty_mask": {"mask": torch.zeros(2, 72, 64)}, "no_steps": {"embedding_steps": 0, "denoiser_steps": 0}}
    results["errors"] = {name: error_of(lambda kw=kw: run("BoothKitQuickTuneConcept", **{**args, **kw}))
                         for name, kw in bad.items()}
    results["untouched_at_end"] = untouched_report(before)
    log("bad input checked")

    t = time.perf_counter()
    results["sdxl"] = sdxl_case(torch, run, vae, images, emb_dir, lora_dir, unet_state)
    results["t_sdxl"] = time.perf_counter() - t
    log("SDXL-shaped model checked")
    results["t_total"] = log.elapsed()

    write_results(a.out, results, tensors)
    return 0


def randomize(torch, module, seed):
    """Finite random weights for a model ComfyUI built without loading a file (its layers skip initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("logit_scale"):
            continue
        if p.ndim >= 2:
            std = 0.02 if "embedding" in name else 1 / p[0].numel() ** 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))  # norms, biases


def sdxl_case(torch, run, vae, images, emb_dir, lora_dir, unet_state) -> dict:
    """An SDXL-shaped model (text width 2048, pooled output into the UNet's ``y``) and a real SDXL CLIP of two
    3-layer encoders (CLIP-L 768 wide, CLIP-G 1280 wide): both embedding vectors are learned, the returned CLIP
    patches both tables, and 'embedding:<name>' (clip_l + clip_g in one file) encodes like the returned CLIP."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from node_runner import stock_lora_loader

    unet_config = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1,
        context_dim=2048, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
        adm_in_channels=2816, num_classes="sequential", num_heads=-1, num_head_channels=32, use_checkpoint=False,
        use_temporal_resblock=False, use_temporal_attention=False)
    model_config = comfy.supported_models.SDXL(unet_config)
    cpu = torch.device("cpu")
    with torch.inference_mode():  # as a loader node would build them
        base = model_config.get_model({})
        randomize(torch, base.diffusion_model, 3)
        model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
        small = {"num_hidden_layers": 3}
        clip = comfy.sd.CLIP(model_config.clip_target(), embedding_directory=[emb_dir],
                             model_options={"clip_l_model_config": small, "clip_g_model_config": small})
        randomize(torch, clip.cond_stage_model, 4)
    tables = {k: getattr(clip.cond_stage_model, f"clip_{k}").transformer.get_input_embeddings() for k in "lg"}
    tables_before = {k: t.weight.detach().clone() for k, t in tables.items()}
    before = unet_state(model)
    qt_model, qt_clip, embedding, lora, report = run(
        "BoothKitQuickTuneConcept", model=model, clip=clip, vae=vae, images=images, identifier=IDENTIFIER,
        class_noun=CLASS_NOUN, init_word="", embedding_steps=2, embedding_lr=5e-3, denoiser_steps=2,
        denoiser_lr=1e-3, lora_rank=2, resolution=64, seed=1)
    name = "sdxl_cat"
    run("BoothKitSaveConcept", embedding=embedding, lora=lora, name=name, overwrite=False)
    prompt = PROMPT.replace(IDENTIFIER, f"embedding:{name}")
    (cond_qt,) = run("CLIPTextEncode", clip=qt_clip, text=PROMPT)
    (cond_emb,) = run("CLIPTextEncode", clip=clip, text=prompt)
    (cond_plain,) = run("CLIPTextEncode", clip=clip, text=PROMPT)
    lora_model, _, warnings = stock_lora_loader(run, model, clip, f"{name}_lora.safetensors")
    sd_qt, sd_lora = unet_state(qt_model), unet_state(lora_model)
    after = unet_state(model)
    with torch.inference_mode():
        clip.load_model()
    ident = clip.tokenize(IDENTIFIER, return_word_ids=True)
    return {
        "report": report,
        "embedding_shapes": {k: list(v.shape) for k, v in embedding.vectors.items()},
        "cond_equal": bool(torch.equal(cond_qt[0][0], cond_emb[0][0])),
        "pooled_equal": bool(torch.equal(cond_qt[0][1]["pooled_output"], cond_emb[0][1]["pooled_output"])),
        "cond_changed": float((cond_qt[0][0] - cond_plain[0][0]).abs().max()),
        "identifier_ids": {k: ident[k][0][1][0] for k in "lg"},
        "lora_loader_warnings": warnings,
        "lora_layers": len({k.split(".")[0] for k in lora.tensors}),
        "lora_loader_patched_keys": len(lora_model.patches),
        "lora_loader_equals_quick_tune": all(torch.equal(sd_lora[k], sd_qt[k]) for k in sd_qt),
        "changed_keys": sum(not torch.equal(sd_qt[k], before[k]) for k in before),
        "unet_state_identical": all(torch.equal(after[k], v) for k, v in before.items()),
        "token_tables_identical": all(torch.equal(tables[k].weight, v) for k, v in tables_before.items()),
    }


if __name__ == "__main__":
    from node_runner import run_main

    run_main(main)
