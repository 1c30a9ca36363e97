"""The in-process half of the real-ComfyUI tier: run with ComfyUI's python (tests/comfyui/conftest.py starts it).

    python driver.py --comfyui COMFYUI_PATH --pack CUSTOM_NODES/boothkit --models MODELS --out OUT

Loads the pack with ComfyUI's own loader (nodes.load_custom_node), writes random-weight InstantBooth files for the
test checkpoint, runs the BoothKit nodes the way ComfyUI's executor calls them, samples with ComfyUI's KSampler code,
and writes what it saw: OUT/results.json (node list, layouts, error messages, rows) and OUT/tensors.safetensors
(latents and denoiser outputs). The assertions are in test_*.py, which read these files."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench", "comfy_support")  # node_runner, make_models
sys.path[:0] = [HERE, SUPPORT]
PROMPT = "a photo of sks person on the beach"
NEGATIVE = "blurry"
LONG_PROMPT = ", ".join(["a very detailed photograph"] * 16) + ", a photo of sks person"  # > 77 tokens


def main(argv=None) -> int:
    from make_models import CHECKPOINT, CLIP_VISION, setup_comfy
    from node_runner import add_model_folders, driver_parser, pack_modules

    p = driver_parser()
    p.add_argument("--instantbooth-dir", required=True, help="where to write the test InstantBooth files")
    a = p.parse_args(argv)

    setup_comfy(a.comfyui, pytorch_attention=True)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import folder_paths
    import nodes

    results, tensors = {}, {}
    t0 = time.perf_counter()

    def log(stage):  # progress on stderr; the test prints it when something fails
        print(f"[driver {time.perf_counter() - t0:6.1f}s] {stage}", file=sys.stderr, flush=True)

    # ---- the pack, through ComfyUI's own loader ---------------------------------------------------------------------
    before = set(sys.modules)
    results["pack_loaded"] = bool(asyncio.run(nodes.load_custom_node(a.pack)))
    results["modules_imported_at_load"] = sorted(m.split(".")[0] for m in set(sys.modules) - before)
    pack_module = os.path.abspath(a.pack).replace(".", "_x_")  # the name load_custom_node gives a package
    results["nodes"] = {k: {"category": v.GET_SCHEMA().category, "display_name": v.GET_SCHEMA().display_name}
                        for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("BoothKit")}
    results["pack_modules_before_first_run"] = sorted(m[len(pack_module):] for m in sys.modules
                                                      if m.startswith(pack_module))
    formats, ibm, host = pack_modules(pack_module, "backend.instantbooth", "backend.instantbooth", "hosts.comfy.instantbooth")
    add_model_folders(a.models)
    folder_paths.add_model_folder_path("instantbooth", a.instantbooth_dir)
    results["t_load_pack"] = time.perf_counter() - t0

    from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func

    def run(node_id, **kwargs):
        """A node called as ComfyUI's executor calls it (execution.py _async_map_node_over_list)."""
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        if issubclass(cls, _ComfyNodeInternal):
            out = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))(**kwargs)
            return out.result
        return getattr(cls(), cls.FUNCTION)(**kwargs)

    def error_of(fn):
        try:
            fn()
        except Exception as e:  # the message is what the UI shows; record it for the test to check
            return f"{type(e).__name__}: {e}"
        return None

    log("pack loaded")
    # ---- models -----------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    model, clip, _ = run("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)[:3]
    (clip_vision,) = run("CLIPVisionLoader", clip_name=CLIP_VISION)
    results["t_load_models"] = time.perf_counter() - t
    results["unet_dtype"] = str(model.model.get_dtype())
    dm = model.get_model_object("diffusion_model")
    layout = host.unet_adapter_layout(dm)
    results["layout"] = layout.to_dict()
    results["reference_layouts"] = reference_layouts(host)

    log("models loaded")
    # ---- random InstantBooth files for this checkpoint (γ = 0.5 trained-looking, γ = 0 fresh, one for SD2); with
    # pixel features (ours), so both hosts' f_p read the backbone's input pixels the same way
    vision = vision_dims(a.comfyui)
    config = ibm.InstantBoothConfig(**vision, ctx_dim=768, layout=layout, family="sd1", identifier="sks",
                                    class_noun="person", pixel_features=True)
    torch.manual_seed(0)
    ib = ibm.InstantBooth(config)
    formats.save_instantbooth(os.path.join(a.instantbooth_dir, "ib_gamma0.safetensors"), ib)
    with torch.no_grad():
        for ad in ib.adapters:
            ad.gate.fill_(0.5)
        ib.pixel_encoder.fc.weight.normal_(std=0.02)
    formats.save_instantbooth(os.path.join(a.instantbooth_dir, "ib_random.safetensors"), ib)
    torch.manual_seed(0)
    config_sd2 = ibm.InstantBoothConfig(**{**config.__dict__, "ctx_dim": 1024, "family": "sd2"})
    formats.save_instantbooth(os.path.join(a.instantbooth_dir, "ib_sd2.safetensors"), ibm.InstantBooth(config_sd2))

    log("InstantBooth files written")
    # ---- nodes ------------------------------------------------------------------------------------------------------
    loader = nodes.NODE_CLASS_MAPPINGS["BoothKitLoadInstantBooth"]
    results["loader_options"] = loader.INPUT_TYPES()["required"]["instantbooth_name"][1]["options"]
    results["validate_missing"] = loader.validate_inputs(instantbooth_name="missing.safetensors")
    (booth,) = run("BoothKitLoadInstantBooth", instantbooth_name="ib_random.safetensors", model=model)
    (booth0,) = run("BoothKitLoadInstantBooth", instantbooth_name="ib_gamma0.safetensors")
    (booth_sd2,) = run("BoothKitLoadInstantBooth", instantbooth_name="ib_sd2.safetensors")
    results["error_load_wrong_family"] = error_of(
        lambda: run("BoothKitLoadInstantBooth", instantbooth_name="ib_sd2.safetensors", model=model))

    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 224, 224, 3), generator=gen).float() / 255  # 8-bit, as LoadImage gives
    tensors["image"] = image
    t = time.perf_counter()
    (concept,) = run("BoothKitInstantBoothEncodeConcept", instantbooth=booth, clip_vision=clip_vision, images=image)
    results["t_encode_concept"] = time.perf_counter() - t
    # the γ=0 file differs in the gates and the pixel map, which its closed gates never read; the SD2 file only needs
    # to reach the Apply node's check. One ViT-L pass each is what CPU time allows.
    concept0 = host.BoothConcept(concept.concept, booth0)
    concept_sd2 = host.BoothConcept(concept.concept, booth_sd2)
    results["pack_modules_after_run"] = sorted(m[len(pack_module):] for m in sys.modules if m.startswith(pack_module))
    tensors["f_c"], tensors["f_p"] = concept.concept.f_c, concept.concept.f_p
    # two images with masks: a subject box in each, the rest background
    images2 = torch.rand(2, 96, 128, 3, generator=gen)
    masks2 = torch.zeros(2, 96, 128)
    masks2[0, 10:60, 20:70] = 1
    masks2[1, 30:90, 50:120] = 1
    (concept2,) = run("BoothKitInstantBoothEncodeConcept", instantbooth=booth, clip_vision=clip_vision,
                      images=images2, masks=masks2)
    results["concept2"] = {"num_images": concept2.concept.num_images, "f_p_shape": list(concept2.concept.f_p.shape)}
    results["error_empty_mask"] = error_of(lambda: run(
        "BoothKitInstantBoothEncodeConcept", instantbooth=booth, clip_vision=clip_vision, images=images2,
        masks=torch.zeros(2, 96, 128)))

    log("concepts encoded")
    (positive,) = run("CLIPTextEncode", clip=clip, text=PROMPT)
    (negative,) = run("CLIPTextEncode", clip=clip, text=NEGATIVE)
    (personal,) = run("BoothKitInstantBoothCondition", conditioning=positive, clip=clip, concept=concept, text=PROMPT,
                      alpha=0.4)
    (personal_te,) = run("BoothKitInstantBoothTextEncode", clip=clip, concept=concept, text="a photo of a person on "
                         "the beach", alpha=0.4, insert_identifier=True)
    (inserted,) = run("BoothKitInstantBoothInsertIdentifier", concept=concept, text="a photo of a person on the beach")
    results["inserted"] = inserted
    results["rows"], _ = host.identifier_rows(clip, PROMPT, "sks")
    tensors["cond"], tensors["cond_personal"] = positive[0][0], personal[0][0]
    tensors["cond_personal_te"], tensors["uncond"] = personal_te[0][0], negative[0][0]
    (long_cond,) = run("CLIPTextEncode", clip=clip, text=LONG_PROMPT)
    (long_personal,) = run("BoothKitInstantBoothCondition", conditioning=long_cond, clip=clip, concept=concept,
                           text=LONG_PROMPT, alpha=0.4)
    results["long_rows"], _ = host.identifier_rows(clip, LONG_PROMPT, "sks")
    tensors["long_cond"], tensors["long_personal"] = long_cond[0][0], long_personal[0][0]
    results["error_no_identifier"] = error_of(lambda: run(
        "BoothKitInstantBoothCondition", conditioning=negative, clip=clip, concept=concept, text=NEGATIVE, alpha=0.4))
    results["error_text_mismatch"] = error_of(lambda: run(
        "BoothKitInstantBoothCondition", conditioning=positive, clip=clip, concept=concept, text=LONG_PROMPT,
        alpha=0.4))
    results["error_apply_wrong_family"] = error_of(lambda: run(
        "BoothKitInstantBoothApply", model=model, concept=concept_sd2, beta=0.3, start_percent=0.0, end_percent=1.0,
        skip_levels="", skip_blocks=""))
    results["error_bad_skip"] = error_of(lambda: run(
        "BoothKitInstantBoothApply", model=model, concept=concept, beta=0.3, start_percent=0.0, end_percent=1.0,
        skip_levels="zero", skip_blocks=""))

    log("conditioning done")
    # ---- sampling: exact identities and the unpatched model left alone ----------------------------------------------
    def apply(c, beta, **kw):
        args = dict(model=model, concept=c, beta=beta, start_percent=0.0, end_percent=1.0, skip_levels="",
                    skip_blocks="")
        args.update(kw)
        return run("BoothKitInstantBoothApply", **args)[0]

    (latent,) = run("EmptyLatentImage", width=128, height=128, batch_size=1)  # small: nine sampling runs on a CPU

    def sample(m, pos=personal):
        return nodes.common_ksampler(m, 7, 2, 7.0, "euler", "normal", pos, negative, latent)[0]["samples"]

    options_before = repr(model.model_options)
    t = time.perf_counter()
    tensors["plain"] = sample(model)
    results["t_sample_plain"] = time.perf_counter() - t
    tensors["gamma0"] = sample(apply(concept0, 0.3))
    # the node's beta 0 means the file's β; a file whose β is 0 turns the adapters off (no patch at all)
    concept.booth.model.config.beta, file_beta = 0.0, concept.booth.model.config.beta
    tensors["beta0"] = sample(apply(concept, 0.0))
    concept.booth.model.config.beta = file_beta
    patched = apply(concept, 0.3)
    t = time.perf_counter()
    tensors["patched"] = sample(patched)
    results["t_sample_patched"] = time.perf_counter() - t
    tensors["plain_after"] = sample(model)
    tensors["patched_again"] = sample(patched)
    tensors["patched_skip0"] = sample(apply(concept, 0.3, skip_levels="0"))
    tensors["patched_window_empty"] = sample(apply(concept, 0.3, start_percent=0.5, end_percent=0.5))
    tensors["patched_late"] = sample(apply(concept, 0.3, start_percent=0.6, end_percent=1.0))
    results["model_options_unchanged"] = repr(model.model_options) == options_before
    results["patched_has_middle_patch"] = "middle_patch" in patched.model_options["transformer_options"].get(
        "patches", {})
    results["original_has_middle_patch"] = "middle_patch" in model.model_options["transformer_options"].get(
        "patches", {})

    log("sampling done")
    # ---- one denoiser evaluation for the diffusers comparison (ComfyUI's apply_model path) --------------------------
    import comfy.model_management

    comfy.model_management.load_models_gpu([patched])
    sampling = patched.get_model_object("model_sampling")
    sigma = sampling.sigmas[500:501].float().expand(2)  # the table's sigma at timestep 500, cond and uncond
    x = torch.randn(2, 4, 32, 32, generator=gen)
    to = dict(patched.model_options["transformer_options"])
    to.update(sigmas=sigma, cond_or_uncond=[0, 1])
    context = torch.cat([personal[0][0], negative[0][0]])
    with torch.no_grad():
        denoised = patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to)
        plain_to = dict(model.model_options["transformer_options"], sigmas=sigma, cond_or_uncond=[0, 1])
        denoised_plain = model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=plain_to)
    tensors.update(x=x, sigma=sigma, x_in=sampling.calculate_input(sigma, x), timestep=sampling.timestep(sigma).float(),
                   eps=(x - denoised) / sigma[:, None, None, None],
                   eps_plain=(x - denoised_plain) / sigma[:, None, None, None], context=context)

    log("denoiser evaluated")
    # ---- an SDXL-shaped UNet: two-block transformers (block_index > 0), no transformer at level 0 -------------------
    t = time.perf_counter()
    results["sdxl"] = sdxl_checks(torch, run, host, ibm, clip_vision, image, a.instantbooth_dir, formats, nodes,
                                  vision)
    results["t_sdxl"] = time.perf_counter() - t

    log("SDXL-shaped checks done")
    from safetensors.torch import save_file

    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(a.out, "tensors.safetensors"))
    results["t_total"] = time.perf_counter() - t0
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


# full-size UNets as comfy/model_detection.py (this commit) configures them for real SD1.5 / SD2.1 / SDXL checkpoints;
# transformer_depth_output is consumed from its end (the first output blocks, at the lowest resolution, come last)
_COMMON = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
               legacy=False, model_channels=320, use_temporal_attention=False, use_temporal_resblock=False)
REFERENCE_UNETS = {
    "sd15": dict(_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=False,
                 context_dim=768, num_heads=8, num_head_channels=-1),
    "sd21": dict(_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=True,
                 context_dim=1024, num_heads=-1, num_head_channels=64),
    "sdxl": dict(_COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                 context_dim=2048, num_heads=-1, num_head_channels=64),
}


def reference_layouts(host) -> dict:
    """Adapter layouts ComfyUI's real SD1.5 / SD2.1 / SDXL UNets give (built on the meta device: no memory)."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    out = {}
    for name, config in REFERENCE_UNETS.items():
        with torch.device("meta"):
            unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
        out[name] = host.unet_adapter_layout(unet).to_dict()
    return out


def vision_dims(comfy_path: str) -> dict:
    """The InstantBooth vision widths of ComfyUI's ViT-L/14 (what the test CLIP vision file is)."""
    with open(os.path.join(comfy_path, "comfy", "clip_vision_config_vitl.json")) as f:
        c = json.load(f)
    return {"vision_global_dim": c["projection_dim"], "vision_token_dim": c["hidden_size"],
            "tokens_per_image": (c["image_size"] // c["patch_size"]) ** 2 + 1}


def sdxl_checks(torch, run, host, ibm, clip_vision, image, ib_dir, formats, nodes, vision) -> dict:
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=2, context_dim=2048,
        use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, adm_in_channels=2816,
        num_classes="sequential", num_heads=-1, num_head_channels=32, use_checkpoint=False,
        use_temporal_resblock=False, use_temporal_attention=False)
    model_config = comfy.supported_models.SDXL(unet_config)
    base = model_config.get_model({})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # ComfyUI leaves weights uninitialised; give them finite random values
        for name, p in base.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5))
            else:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))  # norms, biases
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    layout = host.unet_adapter_layout(model.get_model_object("diffusion_model"))
    config = ibm.InstantBoothConfig(**vision, ctx_dim=2048, layout=layout, family="sdxl")
    torch.manual_seed(1)
    ib = ibm.InstantBooth(config)
    with torch.no_grad():
        for ad in ib.adapters:
            ad.gate.fill_(0.5)
    formats.save_instantbooth(os.path.join(ib_dir, "ib_sdxl.safetensors"), ib)
    (booth,) = run("BoothKitLoadInstantBooth", instantbooth_name="ib_sdxl.safetensors", model=model)
    (concept,) = run("BoothKitInstantBoothEncodeConcept", instantbooth=booth, clip_vision=clip_vision, images=image)
    patched = run("BoothKitInstantBoothApply", model=model, concept=concept, beta=0.3, start_percent=0.0,
                  end_percent=1.0, skip_levels="", skip_blocks="")[0]
    concept.booth.model.config.beta = 0.0  # beta 0 = the file's β, here 0: adapters off
    beta0 = run("BoothKitInstantBoothApply", model=model, concept=concept, beta=0.0, start_percent=0.0,
                end_percent=1.0, skip_levels="", skip_blocks="")[0]
    seen = []

    def record(x, extra_options):  # a second middle_patch that notes where it runs
        seen.append(layout.index(extra_options["transformer_index"], extra_options.get("block_index", 0)))
        return x

    recorded = patched.clone()
    recorded.set_model_patch(record, "middle_patch")
    pos = [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
    neg = [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}

    def sample(m):
        return nodes.common_ksampler(m, 7, 1, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]

    plain = sample(model)
    out = sample(recorded)
    return {
        "layout": layout.to_dict(),
        "adapters_seen_per_forward": sorted(set(seen)),
        "calls": len(seen),
        "beta0_exact": bool(torch.equal(sample(beta0), plain)),
        "patched_max_change": float((out - plain).abs().max()),
        "plain_after_exact": bool(torch.equal(sample(model), plain)),
    }


if __name__ == "__main__":
    from node_runner import run_main

    run_main(main)
