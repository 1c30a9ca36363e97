"""The in-process half of test_half_precision_real.py: InstantBooth Apply (sampling), E4T Tune (its host call) and
Quick-Tune Concept on a UNet stored and computed in fp16, then in bf16, as ComfyUI runs SD models on a GPU (on a CPU
it would cast every layer to fp32; here that cast is switched off, so the layers really compute in half precision).
Run with ComfyUI's python:

    python half_driver.py --comfyui COMFYUI_PATH --pack CUSTOM_NODES/boothkit --models MODELS --work DIR --out OUT

Tiny settings: 2 sampling steps of an 8x8 latent; one 64x64 photo (two for quick-tune), 2 steps (each stage); writes
OUT/results.json."""
from __future__ import annotations

import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench", "comfy_support")  # node_runner, make_models
sys.path[:0] = [HERE, SUPPORT]
STEPS = 2


def main(argv=None) -> int:
    from make_models import CHECKPOINT, CLIP_VISION, random_booth, random_e4t
    from node_runner import (add_model_folders, instance_forwards, node_runner, pack_modules, start, unet_state,
                             write_results)

    a, pack, loaded, log = start(argv, "half")
    import comfy.cli_args
    import comfy.model_management as mm
    import comfy.sample
    import torch

    run = node_runner()
    host, backend, ib_host, ibm = pack_modules(pack, "hosts.comfy.e4t", "backend.e4t", "hosts.comfy.instantbooth",
                                               "backend.instantbooth")
    add_model_folders(a.models)
    mm.unet_manual_cast = lambda *args, **kwargs: None  # compute in the stored dtype, as on a GPU
    (clip_vision,) = run("CLIPVisionLoader", clip_name=CLIP_VISION)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    results = {"pack_loaded": loaded}

    def finite(values) -> bool:
        return all(math.isfinite(v) for v in values)

    gen = torch.Generator().manual_seed(1)
    conds = [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(2)]
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    concept = ibm.Concept(torch.randn(768, generator=gen), torch.randn(257, 768, generator=gen), "sks", "cat", 1)

    def sample(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, 2, 7.0, "euler", "normal", *conds, torch.zeros_like(noise),
                                       disable_pbar=True, seed=0).float()

    for dtype in ("fp16", "bf16"):
        comfy.cli_args.args.fp16_unet, comfy.cli_args.args.bf16_unet = dtype == "fp16", dtype == "bf16"
        model, clip, vae = run("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)[:3]
        dm = model.get_model_object("diffusion_model")
        before = unet_state(model)
        r = results[dtype] = {"unet_dtype": str(model.model.get_dtype()),
                              "manual_cast": str(model.model.manual_cast_dtype)}
        # InstantBooth Apply, then sampling with the patched copy and with the input model
        plain = sample(model)
        (patched,) = run("BoothKitInstantBoothApply", model=model, concept=ib_host.BoothConcept(
            concept, random_booth(model, ib_host, ibm)), beta=0.3, start_percent=0.0, end_percent=1.0,
            skip_levels="", skip_blocks="")
        booth = sample(patched)
        r["instantbooth"] = {"finite": bool(plain.isfinite().all() and booth.isfinite().all()),
                             "changed": float((booth - plain).abs().max()),
                             "plain_unchanged": bool(torch.equal(sample(model), plain))}
        log(f"InstantBooth on {dtype} done")
        with torch.inference_mode(False):
            e4t, modules = random_e4t(model, clip_vision, host, backend, pretrained=0.01, class_word="cat",
                                      hidden=32, tune_lr=1e-2, modulation_rank=2)
        # the host's call as the node makes it (the executor's inference mode, checkpointing on by default); the
        # host, not the node, hands back the losses
        with torch.inference_mode():
            e = host.e4t_tune(model, clip, clip_vision, vae, e4t, image, "cat", steps=STEPS, resolution=64,
                              gradient_checkpointing=True)
        after = unet_state(e.model)
        changed = [k for k in after if not torch.equal(after[k], before[k])]
        r["e4t"] = {"report": e.report, "losses": e.result.losses, "losses_finite": finite(e.result.losses),
                    "diffs_finite": all(bool(v.isfinite().all()) for v in e.lora.tensors.values()),
                    "embedding_finite": bool(e.embedding.vectors["emb_params"].isfinite().all()),
                    "num_changed": len(changed), "num_targets": len(modules),
                    "changed_dtype": str(after[changed[0]].dtype) if changed else None}
        log(f"E4T on {dtype} done")
        qt_model, _, qt_embedding, qt_lora, qt_report = run(
            "BoothKitQuickTuneConcept", model=model, clip=clip, vae=vae, images=image.expand(2, -1, -1, -1),
            identifier="sks", class_noun="cat", init_word="", embedding_steps=STEPS, embedding_lr=5e-3,
            denoiser_steps=STEPS, denoiser_lr=1e-3, lora_rank=4, resolution=64, seed=0)
        qt_after = unet_state(qt_model)
        r["quicktune"] = {
            "report": qt_report, "embedding_finite": bool(qt_embedding.vectors["emb_params"].isfinite().all()),
            "lora_finite": all(bool(v.isfinite().all()) for v in qt_lora.tensors.values()),
            "lora_up_moved": any(bool(v.abs().sum() > 0) for k, v in qt_lora.tensors.items()
                                 if k.endswith("lora_up.weight")),
            "num_changed": sum(not torch.equal(qt_after[k], before[k]) for k in qt_after)}
        final = unet_state(model)
        r["input_unet_identical"] = all(torch.equal(final[k], v) for k, v in before.items())
        r["forwards_left"] = instance_forwards(dm)
        log(f"quick-tune on {dtype} done")
    write_results(a.out, results, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
