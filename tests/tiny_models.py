"""Tiny random-weight models of the real architectures, built in milliseconds (diffusers' test configs)."""
def tiny_unet(cross_attention_dim: int = 32, depth: int = 1, sample_size: int = 16):
    """A diffusers UNet2DConditionModel of the SD layout, a few thousand parameters (diffusers' own test config)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, sample_size=sample_size,
        in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=2, transformer_layers_per_block=depth,
    ).eval()


def tiny_clip_vision(image_size: int = 32, hidden: int = 24, proj: int = 16):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=2, projection_dim=proj)
    return CLIPVisionModelWithProjection(cfg).eval()


def tiny_clip_text(hidden: int = 32, vocab: int = 99):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_tokenizer(folder, words=("a", "photo", "of", "sks", "cat", "dog", "on", "grass", "the", "beach", "man")):
    """A real CLIPTokenizer over a handful of whole words (BPE merges that build each word from its letters)."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = {}, []
    for c in sorted(set("".join(words))):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for w in words:
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + "</w>" if i == len(w) - 1 else ch
            merges.append(f"{cur} {nxt}")
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=32).eval()


def tiny_sd_folder(folder, with_vae: bool = True, cross_attention_dim: int = 32):
    """A diffusers model folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/, vae/) of tiny
    random models, loadable by the same code as a real SD1.x folder."""
    import json
    from pathlib import Path

    from diffusers import DDPMScheduler

    folder = Path(folder)
    tok = tiny_tokenizer(folder / "tokenizer_src")
    tok.save_pretrained(folder / "tokenizer")
    tiny_clip_text(hidden=cross_attention_dim, vocab=len(tok.get_vocab())).save_pretrained(folder / "text_encoder")
    unet = tiny_unet(cross_attention_dim=cross_attention_dim, sample_size=16)
    if not with_vae:
        from diffusers import UNet2DConditionModel

        cfg = dict(unet.config)
        cfg.update(in_channels=3, out_channels=3)
        unet = UNet2DConditionModel.from_config(cfg)
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    if with_vae:
        tiny_vae().save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def write_image_folder(folder, n: int, size: int, box: tuple[int, int, int, int], captions=()):
    """n random square images NNN.png with a mask NNN_mask.png (1 inside ``box`` = y0, y1, x0, x1) and, if
    ``captions`` are given, NNN.txt cycling through them."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y0, y1, x0, x1 = box
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        m = np.zeros((size, size), np.uint8)
        m[y0:y1, x0:x1] = 255
        Image.fromarray(m).save(folder / f"{i:03d}_mask.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(captions[i % len(captions)])
    return folder


def training_world(root, data=None, validation: int = 0):
    """What a trainer reads, tiny: a diffusers folder with a VAE (``root/sd``), a CLIP vision folder (``root/vision``),
    a training set (``data``: a folder, default 6 captioned cats) and ``validation`` images (0: none)."""
    captions = ["a photo of a cat on grass", "a cat on the beach"]
    sd = tiny_sd_folder(root / "sd", with_vae=True)
    tiny_clip_vision().save_pretrained(root / "vision")
    data = data or write_image_folder(root / "data", 6, 32, (4, 24, 6, 28), captions)
    val = write_image_folder(root / "val", validation, 32, (4, 24, 6, 28), captions) if validation else None
    return sd, root / "vision", data, val


def write_config(path, sd, vision, data, validation=None, method: dict | None = None, train: dict | None = None):
    """A trainer config (TOML) over tiny models: [model] and [data] from the paths, then [method] and [train] from
    the dicts (strings quoted, numbers as written). Returns the path."""
    def section(name, values):
        return f"[{name}]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in (values or {}).items())
    text = f'[model]\nbase = "{sd}"\nclip_vision = "{vision}"\n[data]\ntrain = "{data}"\n'
    if validation is not None:
        text += f'validation = "{validation}"\n'
    path.write_text(text + section("method", method) + section("train", train))
    return path
