"""The gated adapter of InstantBooth (InstantBooth paper, eq. 3), one per transformer block of the denoiser:

    y := y + β · tanh(γ) · S([y, f_p])[:len(y)]

placed between the block's self-attention and cross-attention. γ starts at 0, so a fresh adapter is an exact
identity; β is a plain float chosen by the caller (1 in training, ≈0.3 at inference). Built like GLIGEN's
GatedSelfAttentionDense (ComfyUI comfy/gligen.py), without its dense branch, which the paper does not have."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """Gated self-attention over the block's tokens y and the projected patch feature f_p.

    Args:
        dim: width of the transformer block (its token channels).
        ctx_dim: width of f_p (the text-encoder width the patch encoder maps into).
        heads: attention heads; the host passes the block's own head count.
    """

    # Explicit softmax(QKᵀ)V instead of PyTorch's fused kernel: a trainer sets it on CPU, where the fused backward is
    # slow (training/frozen.py). Same result up to rounding; not stored in files.
    eager_attention: bool = False

    def __init__(self, dim: int, ctx_dim: int, heads: int):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"adapter width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.proj = nn.Linear(ctx_dim, dim)  # f_p into the block's width
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))  # γ

    def patch_kv(self, f_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the f_p part of [y, f_p]. They do not depend on y (the norm is per token), so a host
        computes them once per sampling run and reuses them at every step."""
        x = self.norm(self.proj(f_p.to(self.proj.weight.dtype)))
        return self._heads(self.to_k(x)), self._heads(self.to_v(x))

    def forward(self, y: torch.Tensor, f_p: torch.Tensor | None = None, beta: float = 1.0,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """y [B, L, dim]; f_p [B or 1, M, ctx_dim] or its cached ``kv`` from :meth:`patch_kv`."""
        if beta == 0:
            return y  # β = 0 is "adapter off": the very same tensor, bit-identical by construction
        return y + self.residual(y, f_p, beta, kv)

    def residual(self, y: torch.Tensor, f_p: torch.Tensor | None = None, beta: float = 1.0,
                 kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The gated term β·tanh(γ)·S([y, f_p])[:len(y)] alone, for hosts that add it to a residual stream."""
        if kv is None:
            if f_p is None:
                raise ValueError("Adapter needs f_p or its cached keys/values")
            kv = self.patch_kv(f_p)
        k_p, v_p = kv
        b = y.shape[0]
        x = self.norm(y)
        # one GEMM for q, k and v of y's tokens (the weights stay three plain Linears in the file)
        qkv = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
        q, k_y, v_y = (self._heads(t) for t in qkv.chunk(3, dim=-1))
        # Only the first len(y) outputs of S([y, f_p]) are kept, so only y's tokens need queries.
        k = torch.cat([k_y, k_p.to(x.dtype).expand(b, -1, -1, -1)], dim=2)
        v = torch.cat([v_y, v_p.to(x.dtype).expand(b, -1, -1, -1)], dim=2)
        if self.eager_attention:
            out = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return (beta * torch.tanh(self.gate)).to(y.dtype) * out

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, L, H*D] -> [B, H, L, D]
