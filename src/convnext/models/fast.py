"""Fast, exact alternatives of the textbook ConvNeXt block, and where each one is switched on.

`convnext.Block.forward` is the paper's op sequence. In eager mode it hands over to
`block_forward` below, which computes the same function (fp32 logits within 1e-4, the same
training loss curve: `tests/test_models.py`) with fewer passes over the activations:

- LayerScale folded into `pwconv2`: g * (W x + b) = (g W) x + g b, one GEMM instead of GEMM + scale;
- GRN in one pass: gamma * (x * Nx) + beta + x = x * (1 + gamma * Nx) + beta;
- in CPU fp32 inference each MLP Linear is one oneDNN kernel (`torch.ops.mkldnn._linear_pointwise`)
  with the bias, exact GELU and residual add fused into the GEMM. MKL's sgemm, behind `nn.Linear`,
  is up to 2.5x slower on the narrow early stages (40 -> 160 channels). Training keeps `F.linear`:
  a oneDNN forward with nn.Linear's backward measured no faster end to end;
- the 7x7 depthwise conv cropped on maps smaller than the kernel, and computed as a small Toeplitz
  product on tiny maps while training on CPU (`depthwise_conv`).

Tracing, scripting, `torch.compile` and export take the textbook ops, which every backend knows,
unless a block's `graph_form` is "conv_mlp": the MLP as 1x1 convolutions on the channels-last
activations (`block_forward_conv_mlp`, as timm's small models do). `optimize_for_inference` sets it
when it compiles fp32: inductor then runs the MLP as oneDNN convolutions with GELU and the residual
add fused, where its fp32 Linear goes to MKL (convnextv2_atto compiled: 61.8 against 51.5 img/s on
an AVX-512 Zen 5; convnext_tiny 10.0 against 8.5; in bf16 the two forms are equal).
`fuse_for_inference` folds LN's affine, LayerScale and GRN's beta into the Linears, one way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GRN, LayerNorm, autocast_active

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's bf16 kernels need AVX-512 (or AMX): on an AVX2 CPU its bf16 Linear has no primitive at all, and a
# bf16 model runs aten's kernels there
_ONEDNN_BF16 = _HAS_ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def capturing_graph() -> bool:
    """Whether a graph is being traced, compiled or exported (then: textbook ops only)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Eager fp32 or bf16 (a bf16 model, not autocast) on CPU: where oneDNN's fused Linear kernels
    (bias, GELU, residual add) apply."""
    return (_HAS_ONEDNN and x.device.type == "cpu" and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16
                                                                                        and _ONEDNN_BF16))
            and weight.dtype == x.dtype and not autocast_active(x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`[residual +] [gelu](F.linear(x, weight, bias))` on the last dim; one oneDNN kernel in CPU inference."""
    if torch.is_grad_enabled() or not _onednn(x, weight) or (gelu and residual is not None):
        y = F.linear(x, weight, bias)
        y = F.gelu(y) if gelu else y
        return y if residual is None else residual + y
    x = x.contiguous()
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")


def grn(module: GRN, x: torch.Tensor) -> torch.Tensor:
    """GRN as x * (1 + gamma * Nx) + beta: one pass over x after the norm instead of four.

    The statistics (spatial L2 norm, channel mean) are fp32 whatever x's dtype; the per-channel scale
    is then applied in x's dtype, so a bf16 model makes no fp32 copy of its activations.
    """
    gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True, dtype=torch.float32)  # (N, 1, 1, C)
    scale = torch.addcmul(torch.ones_like(gx), module.gamma.float(), gx / (gx.mean(dim=-1, keepdim=True) + module.eps))
    if x.dtype == torch.float32 or autocast_active(x):
        xf = x.float()
        return (xf * scale if module.beta is None else torch.addcmul(module.beta.float(), xf, scale)).to(x.dtype)
    scale = scale.to(x.dtype)
    return x * scale if module.beta is None else torch.addcmul(module.beta.to(x.dtype), x, scale)


@functools.lru_cache(maxsize=64)
def _tap_index(k: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(H*W in, H*W out) index into a flattened k x k kernel; k*k (a zero tap) where none applies."""
    c = k // 2
    di = torch.arange(h)[:, None] - torch.arange(h)[None, :] + c  # (h_in, h_out)
    dj = torch.arange(w)[:, None] - torch.arange(w)[None, :] + c
    ok = ((di >= 0) & (di < k))[:, None, :, None] & ((dj >= 0) & (dj < k))[None, :, None, :]
    tap = di[:, None, :, None] * k + dj[None, :, None, :]
    return torch.where(ok, tap, k * k).reshape(h * w, h * w).to(device)


def _weight_grad(xp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Depthwise-conv weight gradient, (N, H+k-1, W+k-1, C) padded input and (N, H, W, C) output gradient
    (channels-last views) -> (k, k, C), accumulated in fp32: k*k multiply-sums over the same positions,
    which inductor fuses into one pass (the aten kernel spends ~30x longer than the arithmetic needs)."""
    n, h, w, c = g.shape
    k = xp.shape[1] - h + 1
    return torch.stack([(xp[:, i:i + h, j:j + w].float() * g.float()).sum((0, 1, 2))
                        for i in range(k) for j in range(k)]).view(k, k, c)


_compiled_weight_grad: list = []  # [compiled function] once built, [None] if this machine cannot compile


def use_fused_depthwise_backward(model: nn.Module, on: bool = True) -> None:
    """Switch the bf16 CPU-training depthwise backward (`_DepthwiseConvFn`) on or off in `model`'s blocks.

    Off by default: it compiles once per feature-map shape (~5-20 s in all), which pays back only on runs
    of a few hundred steps or more; the training engine switches it on for such runs. A setting of the
    model, as `graph_form` is: nothing process-wide changes."""
    for m in model.modules():
        if hasattr(m, "fused_dw_backward"):
            m.fused_dw_backward = bool(on)


def _depthwise_weight_grad(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    if not _compiled_weight_grad:
        try:
            import torch._inductor  # noqa: F401  (needs a C++ compiler at the first call)

            _compiled_weight_grad.append(torch.compile(_weight_grad, dynamic=False))
        except Exception:  # noqa: BLE001
            _compiled_weight_grad.append(None)
    fn = _compiled_weight_grad[0]
    if fn is not None:
        try:
            xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0])).permute(0, 2, 3, 1).contiguous()
            return fn(xp, g.permute(0, 2, 3, 1).contiguous()).permute(2, 0, 1)[:, None].to(weight.dtype)
        except Exception as e:  # noqa: BLE001 - no compiler here: the aten kernel, from now on
            import logging

            logging.getLogger(__name__).warning("depthwise weight gradient: torch.compile failed (%s); "
                                                "using the aten kernel", str(e).splitlines()[0][:120])
            _compiled_weight_grad[0] = None
    c = x.shape[1]
    return torch.ops.aten.convolution_backward(g, x, weight, [c], [1, 1], list(pad), [1, 1], False, [0, 0], c,
                                               [False, True, False])[1]


class _DepthwiseConvFn(torch.autograd.Function):
    """Depthwise conv ("same" padding, stride 1) with a faster backward on CPU: the input gradient as a
    forward conv with the flipped kernel, the weight gradient as one fused pass (`_weight_grad`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.pad = pad
        return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = F.conv2d(g, weight.flip(2, 3), None, padding=ctx.pad, groups=x.shape[1]) if ctx.needs_input_grad[0] else None
        grad_w = _depthwise_weight_grad(x, g, weight, ctx.pad) if ctx.needs_input_grad[1] else None
        grad_b = g.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor, fused_backward: bool = False) -> torch.Tensor:
    """`conv(x)` for a depthwise conv (groups = channels, odd square kernel, "same" padding), cheapest way.

    - maps smaller than the kernel (H or W < k): the outer taps only ever meet zero padding, so a
      center crop of the kernel with matching padding gives the same output;
    - tiny maps while training on CPU (H*W <= 16): the conv as a product with a per-channel
      (H*W x H*W) Toeplitz matrix gathered from the kernel (a batched matmul; for H*W <= 4 a
      broadcast multiply-sum over channels-last data); CPU depthwise backward kernels spend 5-60x
      longer on such shapes than the arithmetic needs (convnext_atto at 32 px: 1.45x faster steps);
    - bf16 training on CPU, once `use_fused_depthwise_backward(model)` is on, `_DepthwiseConvFn` (a faster
      backward; convnext_tiny b8 bf16 training steps 1.26x faster on an AVX-512 Zen 5, after ~20 s of
      compiling once per shape; in fp32 it measured only 1.03-1.08x, not worth the compile, so fp32
      keeps the aten kernels);
    - otherwise `conv` itself.
    """
    n, ch, h, w = x.shape
    k = conv.kernel_size[0]
    c = k // 2
    if h * w <= 16 and torch.is_grad_enabled() and x.device.type == "cpu":
        weight = torch.cat([conv.weight.reshape(ch, k * k), conv.weight.new_zeros(ch, 1)], dim=1)
        toeplitz = weight[:, _tap_index(k, h, w, x.device)]  # (C, HW_in, HW_out)
        if h * w <= 4:
            xl = x.permute(0, 2, 3, 1).reshape(n, h * w, 1, ch)  # (N, HW_in, 1, C)
            out = (xl * toeplitz.permute(1, 2, 0)).sum(1) + conv.bias  # (N, HW_out, C)
            return out.reshape(n, h, w, ch).permute(0, 3, 1, 2)
        out = torch.bmm(x.permute(1, 0, 2, 3).reshape(ch, n, h * w), toeplitz)  # (C, N, HW_out)
        out = out + conv.bias[:, None, None]
        return out.reshape(ch, n, h, w).permute(1, 0, 2, 3)
    kh, kw = min(k, 2 * h - 1), min(k, 2 * w - 1)
    weight = conv.weight[:, :, c - kh // 2:c + kh // 2 + 1, c - kw // 2:c + kw // 2 + 1] if kh < k or kw < k else conv.weight
    bf16 = x.dtype == torch.bfloat16 or (autocast_active(x) and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if (fused_backward and torch.is_grad_enabled() and x.device.type == "cpu" and bf16
            and (x.requires_grad or weight.requires_grad)):
        with torch.autocast("cpu", enabled=False):  # the same bf16 compute autocast would do, explicitly
            return _DepthwiseConvFn.apply(x.to(torch.bfloat16), weight.to(torch.bfloat16),
                                          conv.bias.to(torch.bfloat16), (kh // 2, kw // 2))
    return F.conv2d(x, weight, conv.bias, padding=(kh // 2, kw // 2), groups=ch)


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ConvNeXt block (`models.convnext.Block`), computed the fast way: (N, C, H, W) -> (N, C, H, W)."""
    if capturing_graph():
        return block_forward_conv_mlp(block, x)
    shortcut = x
    x = depthwise_conv(block.dwconv, x, block.fused_dw_backward).permute(0, 2, 3, 1)  # (N, H, W, C), a free view of channels-last memory
    x = linear(block.norm(x), block.pwconv1.weight, block.pwconv1.bias, gelu=True)
    if isinstance(block.grn, GRN):
        x = grn(block.grn, x)
    w2, b2 = block.pwconv2.weight, block.pwconv2.bias
    if block.gamma is not None:  # LayerScale folded into the last Linear
        w2, b2 = block.gamma[:, None] * w2, block.gamma * b2
    if block.drop_path.p > 0 and block.training:
        return shortcut + block.drop_path(linear(x, w2, b2).permute(0, 3, 1, 2))
    return linear(x, w2, b2, residual=shortcut.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def block_forward_conv_mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block with its MLP as 1x1 convolutions on (N, C, H, W) (channels-last memory): for graphs."""
    shortcut = x
    x = block.dwconv(x)
    x = block.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LN over channels
    x = F.gelu(F.conv2d(x, block.pwconv1.weight[:, :, None, None], block.pwconv1.bias))
    if isinstance(block.grn, GRN):  # GRN over (H, W) of (N, 4C, H, W), statistics in fp32
        gx = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True, dtype=torch.float32)
        nx = gx / (gx.mean(dim=1, keepdim=True) + block.grn.eps)
        x = x * (1 + block.grn.gamma.float()[:, None, None] * nx).to(x.dtype)
        if block.grn.beta is not None:
            x = x + block.grn.beta[:, None, None].to(x.dtype)
    w2, b2 = block.pwconv2.weight, block.pwconv2.bias
    if block.gamma is not None:  # LayerScale folded into the last conv
        w2, b2 = block.gamma[:, None] * w2, block.gamma * b2
    return shortcut + block.drop_path(F.conv2d(x, w2[:, :, None, None], b2))


def use_graph_form(model: nn.Module, form: str | None) -> None:
    """Set every block's `graph_form` ("conv_mlp" or None: the textbook) for graphs captured from now on."""
    if form not in (None, "conv_mlp"):
        raise ValueError(f"unknown graph form {form!r}")
    for m in model.modules():
        if hasattr(m, "graph_form"):
            m.graph_form = form


@torch.no_grad()
def fuse_block(block: nn.Module) -> None:
    """Fold LN's affine into pwconv1, LayerScale and GRN's beta into pwconv2 (the same function)."""
    w, b = block.norm.weight, block.norm.bias
    block.pwconv1.bias.add_(block.pwconv1.weight @ b)  # W1 (xhat*w + b) + b1 = (W1 diag w) xhat + (W1 b + b1)
    block.pwconv1.weight.mul_(w)
    block.norm = LayerNorm(block.norm.normalized_shape, eps=block.norm.eps, elementwise_affine=False)
    if isinstance(block.grn, GRN) and block.grn.beta is not None:  # W2 (y + beta) + b2
        block.pwconv2.bias.add_(block.pwconv2.weight @ block.grn.beta)
        block.grn.beta = None
    if block.gamma is not None:
        block.pwconv2.weight.mul_(block.gamma[:, None])
        block.pwconv2.bias.mul_(block.gamma)
        block.gamma = None
