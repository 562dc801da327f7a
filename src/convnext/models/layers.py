"""Layers of ConvNeXt that torch does not ship: LayerNorm (channels-last and -first), GRN, DropPath.

`models` imports torch only: torchvision's `ops.StochasticDepth` would do for DropPath, but
importing torchvision costs ~2 s on every `import convnext` and CLI call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autocast_active(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (devices without autocast, such as `meta`: no)."""
    return x.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(x.device.type)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last (channel) dim of (N, H, W, C) or (N, C) inputs.

    Statistics are computed in fp32 and the result has the input's dtype: low-precision mean and
    variance are a known source of NaNs in ConvNeXt V2. torch's layer_norm accumulates bf16/fp16
    inputs in fp32 itself (and autocast runs it in fp32), so no copy of the input is made for it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if autocast_active(x):  # autocast would hand back fp32: keep the input's dtype
            return super().forward(x).to(x.dtype)
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channel dim of (N, C, H, W) inputs (the official "channels_first" LN).

    Implemented as permute -> last-dim LayerNorm -> permute, which is exact and lets torch use its
    fused layer_norm kernel instead of the official hand-written mean/var formula.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2, eq. 1-3) on (N, H, W, C) inputs.

    Gx = ||x||_2 over (H, W); Nx = Gx / (mean_C(Gx) + eps); out = gamma * (x * Nx) + beta + x.
    gamma and beta start at zero, so a fresh GRN is the identity. Computed in fp32: the spatial
    sum of squares overflows fp16 and loses precision in bf16. `beta` is None once folded into the
    next Linear (`fast.fuse_for_inference`).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        gx = torch.linalg.vector_norm(xf, ord=2, dim=(1, 2), keepdim=True)  # (N, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        out = self.gamma.float() * (xf * nx) + xf
        if self.beta is not None:
            out = out + self.beta.float()
        return out.to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drop the residual branch, scale by 1/keep.

    Same semantics as timm's `DropPath` and torchvision's `StochasticDepth(p, "row")`.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
