"""Layers of ConvNeXt that torch does not ship: LayerNorm (channels-last and -first), GRN, DropPath.

`models` imports torch only: torchvision's `ops.StochasticDepth` would do for DropPath, but
importing torchvision costs ~2 s on every `import convnext` and CLI call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last (channel) dim of (N, H, W, C) or (N, C) inputs.

    Statistics are computed in fp32 and the result cast back to the input dtype: under bf16/fp16
    autocast, low-precision mean/variance are a known source of NaNs in ConvNeXt V2.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


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
    gamma and beta start at zero, so a fresh GRN is the identity. Computed in fp32 (the spatial
    sum of squares overflows fp16 and loses precision in bf16), as x * (1 + gamma * Nx) + beta: one
    pass over x after the norm instead of four. `beta` is None once folded into the next Linear.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        gx = torch.linalg.vector_norm(xf, ord=2, dim=(1, 2), keepdim=True)  # (N, 1, 1, C)
        scale = torch.addcmul(torch.ones_like(gx), self.gamma.float(), gx / (gx.mean(dim=-1, keepdim=True) + self.eps))
        out = xf * scale if self.beta is None else torch.addcmul(self.beta.float(), xf, scale)
        return out.to(x.dtype)


_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor) -> bool:
    """Eager fp32 on CPU: where oneDNN's fused Linear kernels (bias, GELU, residual add) apply.

    Tracing, scripting, compiling and exporting take the reference ops, which every backend knows.
    """
    return (_HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`[residual +] [gelu](F.linear(x, weight, bias))` on the last dim.

    In CPU fp32 inference this is one oneDNN kernel: the bias, exact GELU and residual add are
    fused into the GEMM (three fewer passes over the activations), and oneDNN avoids MKL's slow
    sgemm path on ConvNeXt's narrow early stages (40 -> 160 channels: 2.5x faster here). Training
    uses `F.linear`: a oneDNN forward with nn.Linear's backward measured no faster end to end.
    """
    if torch.is_grad_enabled() or not _onednn(x) or (gelu and residual is not None):
        y = F.linear(x, weight, bias)
        y = F.gelu(y) if gelu else y
        return y if residual is None else residual + y
    x = x.contiguous()
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")


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


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise conv (groups = channels, odd square kernel, "same" padding) that is fast on small maps.

    Exactly the convolution of `nn.Conv2d`, evaluated in the cheapest of three equivalent ways:
    - maps smaller than the kernel (H or W < k): the outer taps only ever meet zero padding, so a
      center crop of the kernel with matching padding gives the same output;
    - tiny maps while training on CPU (H*W <= 16): the conv as a product with a per-channel
      (H*W x H*W) Toeplitz matrix gathered from the kernel (a batched matmul; for H*W <= 4 a
      broadcast multiply-sum over channels-last data); CPU depthwise backward kernels spend 5-60x
      longer on such shapes than the arithmetic needs (convnext_atto at 32 px: 1.45x faster steps);
    - otherwise, and whenever a graph is traced, compiled or exported, `nn.Conv2d`.
    Same parameters and state-dict keys as `nn.Conv2d(dim, dim, k, padding=k//2, groups=dim)`.
    """

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self._taps: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _tap_index(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(H*W in, H*W out) index into the flattened kernel; k*k (a zero) where no tap applies."""
        key = (h, w, device)
        if key not in self._taps:
            k, c = self.kernel_size[0], self.kernel_size[0] // 2
            di = torch.arange(h)[:, None] - torch.arange(h)[None, :] + c  # (h_in, h_out)
            dj = torch.arange(w)[:, None] - torch.arange(w)[None, :] + c
            ok = ((di >= 0) & (di < k))[:, None, :, None] & ((dj >= 0) & (dj < k))[None, :, None, :]
            tap = di[:, None, :, None] * k + dj[None, :, None, :]
            self._taps[key] = torch.where(ok, tap, k * k).reshape(h * w, h * w).to(device)
        return self._taps[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return super().forward(x)  # a graph for any input size: no branch on H, W
        n, ch, h, w = x.shape
        k, c = self.kernel_size[0], self.kernel_size[0] // 2
        if h * w <= 16 and torch.is_grad_enabled() and x.device.type == "cpu":
            weight = torch.cat([self.weight.reshape(ch, k * k), self.weight.new_zeros(ch, 1)], dim=1)
            toeplitz = weight[:, self._tap_index(h, w, x.device)]  # (C, HW_in, HW_out)
            if h * w <= 4:
                xl = x.permute(0, 2, 3, 1).reshape(n, h * w, 1, ch)  # (N, HW_in, 1, C)
                out = (xl * toeplitz.permute(1, 2, 0)).sum(1) + self.bias  # (N, HW_out, C)
                return out.reshape(n, h, w, ch).permute(0, 3, 1, 2)
            out = torch.bmm(x.permute(1, 0, 2, 3).reshape(ch, n, h * w), toeplitz)  # (C, N, HW_out)
            out = out + self.bias[:, None, None]
            return out.reshape(ch, n, h, w).permute(1, 0, 2, 3)
        kh, kw = min(k, 2 * h - 1), min(k, 2 * w - 1)
        if kh < k or kw < k:
            weight = self.weight[:, :, c - kh // 2:c + kh // 2 + 1, c - kw // 2:c + kw // 2 + 1]
            return F.conv2d(x, weight, self.bias, padding=(kh // 2, kw // 2), groups=ch)
        return super().forward(x)
