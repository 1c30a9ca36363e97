import pytest
import torch

from boothkit.backend.adapter import Adapter
from boothkit.backend.encoders import ConceptEncoder, PatchEncoder
from boothkit.backend.instantbooth import AdapterLayout, InstantBooth, InstantBoothConfig


def test_fresh_adapter_is_identity_and_beta_zero_is_same_tensor():
    a = Adapter(dim=32, ctx_dim=16, heads=4)
    y, f_p = torch.randn(2, 64, 32), torch.randn(1, 10, 16)
    assert torch.equal(a(y, f_p, beta=1.0), y), "γ=0 must leave y bit-identical"
    with torch.no_grad():
        a.gate.fill_(0.7)
    assert a(y, f_p, beta=0.0) is y
    out = a(y, f_p, beta=1.0)
    assert out.shape == y.shape and not torch.allclose(out, y)


def test_adapter_matches_the_paper_formula():
    """y + β·tanh(γ)·S([y, f_p])[:len(y)], with S a plain pre-norm self-attention over the concatenation."""
    torch.manual_seed(1)
    a = Adapter(dim=16, ctx_dim=8, heads=2)
    with torch.no_grad():
        a.gate.fill_(0.5)
    y, f_p = torch.randn(1, 5, 16), torch.randn(1, 3, 8)
    x = a.norm(torch.cat([y, a.proj(f_p)], dim=1))
    q, k, v = a.to_q(x), a.to_k(x), a.to_v(x)
    heads = lambda t: t.view(1, -1, 2, 8).transpose(1, 2)
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 8 ** 0.5, dim=-1) @ heads(v)
    s = a.to_out(att.transpose(1, 2).reshape(1, -1, 16))[:, :5]
    expected = y + 0.3 * torch.tanh(torch.tensor(0.5)) * s
    assert torch.allclose(a(y, f_p, beta=0.3), expected, atol=1e-5)


def test_cached_kv_equals_recomputed_and_broadcasts_over_batch():
    a = Adapter(dim=32, ctx_dim=16, heads=4)
    with torch.no_grad():
        a.gate.fill_(1.0)
    y, f_p = torch.randn(3, 20, 32), torch.randn(1, 7, 16)
    kv = a.patch_kv(f_p)
    assert torch.equal(a(y, f_p, 0.5), a(y, beta=0.5, kv=kv))
    with pytest.raises(ValueError, match="needs f_p"):
        a(y, beta=0.5)


def test_encoders_average_and_concatenate_over_images():
    ce, pe = ConceptEncoder(12, 8), PatchEncoder(10, 8)
    g, t = torch.randn(3, 12), torch.randn(3, 5, 10)
    f_c, f_p = ce(g), pe(t)
    assert f_c.shape == (8,) and f_p.shape == (15, 8)
    assert torch.allclose(f_c, ce.fc(g).mean(0))
    assert torch.allclose(f_p[5:10], pe.fc(t[1]))
    # N images -> N*T patch tokens; f_c of N copies of one image is that image's f_c
    assert pe(torch.randn(4, 5, 10)).shape == (20, 8)
    assert torch.allclose(ce(g[:1].expand(4, -1)), ce(g[:1]), atol=1e-6)
    with pytest.raises(ValueError, match="global features"):
        ce(torch.randn(12))


def layout():
    return AdapterLayout(dims=[32, 32, 64, 64, 32], heads=[4, 4, 8, 8, 4], levels=[0, 0, 1, 1, 0], depths=[2, 2, 1])


def test_layout_index_and_select():
    lay = layout()
    assert [lay.index(0, 0), lay.index(0, 1), lay.index(1, 1), lay.index(2, 0)] == [0, 1, 3, 4]
    assert lay.select(skip_levels=[0]) == [False, False, True, True, False]
    assert lay.select(skip_blocks=[3]) == [True, True, True, False, True]
    with pytest.raises(IndexError, match="depths"):
        lay.index(2, 1)
    with pytest.raises(ValueError, match="do not exist"):
        lay.select(skip_blocks=[9])
    with pytest.raises(ValueError, match="inconsistent"):
        AdapterLayout(dims=[8], heads=[1, 1], levels=[0], depths=[1])


@pytest.mark.parametrize("family,ctx", [("sd1", 768), ("sd2", 1024), ("sdxl", 2048)])
def test_instantbooth_encode_at_sd_widths(family, ctx):
    cfg = InstantBoothConfig(vision_global_dim=20, vision_token_dim=12, tokens_per_image=5, ctx_dim=ctx,
                             layout=layout(), family=family)
    ib = InstantBooth(cfg)
    c = ib.encode(torch.randn(2, 20), torch.randn(2, 5, 12))
    assert c.f_c.shape == (ctx,) and c.f_p.shape == (10, ctx) and c.num_images == 2
    kv = ib.patch_kv(c.f_p, enabled=[True, False, True, True, True])
    assert kv[1] is None and kv[2][0].shape == (1, 8, 10, 8)
    with pytest.raises(ValueError, match="trained on a backbone with 20 / 12"):
        ib.encode(torch.randn(2, 21), torch.randn(2, 5, 12))


def test_family_width_mismatch_is_rejected():
    with pytest.raises(ValueError, match="family sd1 has text width 768, but ctx_dim is 1024"):
        InstantBoothConfig(vision_global_dim=4, vision_token_dim=4, tokens_per_image=1, ctx_dim=1024,
                           layout=layout(), family="sd1")


def test_eager_attention_matches_the_fused_kernel_values_and_gradients():
    """The trainers' CPU kernel (explicit softmax(QKᵀ)V) computes what SDPA computes, forward and backward."""
    torch.manual_seed(2)
    a = Adapter(dim=32, ctx_dim=16, heads=2)
    with torch.no_grad():
        a.gate.fill_(0.8)
    y, f_p = torch.randn(3, 20, 32), torch.randn(3, 7, 16)
    grads = []
    for eager in (False, True):
        a.eager_attention = eager
        a.zero_grad()
        out = a(y, f_p)
        out.square().sum().backward()
        grads.append((out.detach(), a.to_q.weight.grad.clone(), a.proj.weight.grad.clone()))
    (o1, q1, p1), (o2, q2, p2) = grads
    assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(q1, q2, atol=1e-4) and torch.allclose(p1, p2, atol=1e-4)
    assert "eager_attention" not in a.state_dict(), "a kernel choice, not a weight"


def test_pixel_features_start_at_zero_and_each_patch_reaches_only_its_token():
    """Ours (InstantBoothConfig.pixel_features): f_p's token of patch (r, c) gets that patch's pixels; the class
    token gets nothing; a fresh pixel map leaves f_p exactly the paper's; a file that has it refuses to encode
    without pixels."""
    torch.manual_seed(0)
    cfg = {"vision_global_dim": 20, "vision_token_dim": 12, "tokens_per_image": 17, "ctx_dim": 8,
           "layout": layout(), "family": "toy", "image_size": 16}
    plain, ours = InstantBooth(InstantBoothConfig(**cfg)), InstantBooth(InstantBoothConfig(**cfg, pixel_features=True))
    ours.load_state_dict(plain.state_dict(), strict=False)
    g, t, px = torch.randn(2, 20), torch.randn(2, 17, 12), torch.rand(2, 3, 16, 16)
    assert torch.equal(ours.encode(g, t, px).f_p, plain.encode(g, t).f_p)
    with pytest.raises(ValueError, match="pass the backbone's input images"):
        ours.encode(g, t)
    with torch.no_grad():
        ours.pixel_encoder.fc.weight.normal_()
    before = ours.encode(g, t, px).f_p
    assert before.shape == (34, 8) and not torch.allclose(before, plain.encode(g, t).f_p)
    px2 = px.clone()
    px2[1, :, 4:8, 12:16] += 1  # image 1, patch row 1, column 3 of the 4 × 4 grid (4 px patches)
    changed = (ours.encode(g, t, px2).f_p != before).any(-1).nonzero().flatten().tolist()
    assert changed == [17 + 1 + 1 * 4 + 3]
    batched = ours.patch_features(t[None], px[None])  # the trainer's [B, N, ...] layout
    assert torch.allclose(batched[0], before)
    with pytest.raises(ValueError, match="square patch grid"):
        InstantBooth(InstantBoothConfig(**{**cfg, "tokens_per_image": 16}, pixel_features=True))
