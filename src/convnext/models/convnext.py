"""ConvNeXt V1 (Liu et al., CVPR 2022) and V2 (Woo et al., CVPR 2023) in one model family.

Reading order, as in the papers: `Block` (dw 7x7 -> LN -> Linear 4C -> GELU [-> GRN] -> Linear C
[-> LayerScale] -> DropPath + residual), `Stage` (optional LN + 2x2/2 downsampling, then blocks),
`ConvNeXt` (4x4/4 "patchify" stem + LN, four stages, head = global mean pool -> LN -> Linear),
`ConvNeXtIsotropic` (16x16 patchify stem, one constant-width stack; paper section 3.3), and the
registered variants as a table. V1 and V2 differ only in `use_grn` and `ls_init_value`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast
from .layers import GRN, DropPath, LayerNorm, LayerNorm2d


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ConvNeXtConfig:
    """Everything that defines a hierarchical ConvNeXt; serialisable, saved with every checkpoint."""

    depths: tuple[int, ...] = (3, 3, 9, 3)  # blocks per stage; ConvNeXt-T mirrors Swin-T's 1:1:3:1
    dims: tuple[int, ...] = (96, 192, 384, 768)  # channels per stage, doubling like a ResNet
    use_grn: bool = False  # V2: Global Response Normalization in the MLP
    ls_init_value: float | None = 1e-6  # V1 LayerScale; None (V2) means no LayerScale parameter
    in_chans: int = 3
    num_classes: int = 1000  # 0 -> no classifier, forward returns pooled, normalised features
    drop_path_rate: float = 0.0  # stochastic depth at the last block, linear from 0 (paper 0.1-0.5)
    head_init_scale: float = 1.0  # 0.001 when fine-tuning from a checkpoint (official recipe)
    norm_eps: float = 1e-6  # official LN eps everywhere (HF uses 1e-12 for the final LN)
    patch_size: int = 4  # stem: non-overlapping 4x4 "patchify" conv, stride 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        _check(len(self.depths) == len(self.dims) >= 1 and min(self.depths) >= 1 and min(self.dims) >= 1,
               f"depths {self.depths} and dims {self.dims} must be non-empty, positive and of equal length")
        _check(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")
        _check_common(self)


@dataclass(frozen=True)
class ConvNeXtIsotropicConfig:
    """An isotropic ConvNeXt: ViT-style patchify stem, no downsampling, constant width."""

    depth: int = 18
    dim: int = 384
    use_grn: bool = False
    ls_init_value: float | None = None  # official TRAINING.md: 0 (off) for S/B, 1e-6 for L
    in_chans: int = 3
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    head_init_scale: float = 1.0
    norm_eps: float = 1e-6
    patch_size: int = 16  # 16x16 patches as ViT-B/16

    def __post_init__(self) -> None:
        _check(self.depth >= 1 and self.dim >= 1, f"depth {self.depth} and dim {self.dim} must be positive")
        _check_common(self)


def _check_common(cfg: ConvNeXtConfig | ConvNeXtIsotropicConfig) -> None:
    _check(cfg.in_chans >= 1, f"in_chans must be >= 1, got {cfg.in_chans}")
    _check(cfg.num_classes >= 0, f"num_classes must be >= 0, got {cfg.num_classes}")
    _check(0.0 <= cfg.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")


class Block(nn.Module):
    """ConvNeXt block (paper Fig. 4 / V2 Fig. 5): (N, C, H, W) -> (N, C, H, W).

    Two exact implementations: `forward` below is the paper's op sequence; in eager mode the
    same function is computed by `fast.block_forward` (folded LayerScale, one-pass GRN, oneDNN
    Linear+GELU / Linear+residual kernels, depthwise reformulations on small maps), which we use
    because it measured faster on CPU (`benchmarks/`). `fast_path = False` selects the textbook.
    Graphs (tracing, compile, export) take the textbook, unless `graph_form` names a fast one.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float | None = 1e-6,
                 use_grn: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # spatial mixing, like attention
        self.norm = LayerNorm(dim, eps=eps)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # inverted bottleneck, expansion 4 like a Transformer MLP
        self.act = nn.GELU()  # exact (erf) GELU
        self.grn = GRN(4 * dim) if use_grn else nn.Identity()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # LayerScale: a per-channel gain that starts near zero so deep stacks start near identity.
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value else None
        self.drop_path = DropPath(drop_path)
        self.fast_path = True
        self.graph_form: str | None = None  # "conv_mlp": the MLP as 1x1 convs in graphs (fast.block_forward)
        self.fused_dw_backward = False  # bf16 CPU training: the compiled depthwise backward (fast.depthwise_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path and (self.graph_form is not None or not fast.capturing_graph()):
            return fast.block_forward(self, x)
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)  # (N, H, W, 4C)
        x = self.act(x)
        x = self.grn(x)
        x = self.pwconv2(x)  # (N, H, W, C)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return shortcut + self.drop_path(x)


class Stage(nn.Module):
    """Optional downsampling (LN + 2x2 stride-2 conv, like Swin's patch merging), then blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float],
                 ls_init_value: float | None, use_grn: bool, eps: float, downsample: bool) -> None:
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(OrderedDict(
                norm=LayerNorm2d(in_dim, eps=eps),
                conv=nn.Conv2d(in_dim, dim, kernel_size=2, stride=2),
            ))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, dp, ls_init_value, use_grn, eps) for dp in drop_paths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def stem(in_chans: int, dim: int, patch_size: int, eps: float) -> nn.Sequential:
    """"Patchify" stem: a non-overlapping patch_size x patch_size conv, then LayerNorm."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
        norm=LayerNorm2d(dim, eps=eps),
    ))


class Head(nn.Module):
    """Global average pooling -> LayerNorm -> Linear: (N, C, H, W) -> (N, num_classes)."""

    def __init__(self, dim: int, num_classes: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((-2, -1)))
        return x if pre_logits else self.fc(x)


class FeatureInfo(list):
    """One dict per output level: `num_chs`, `reduction` (stride) and `module`, as timm's feature_info."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


def _init_weights(m: nn.Module) -> None:
    # trunc_normal_(std=.02) with torch's default absolute bounds (-2, 2) = timm's; zero biases.
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ConvNeXtClassifierAPI(nn.Module):
    """What both ConvNeXt families share: timm's classifier API, init, grad checkpointing, fast path."""

    head: Head
    cfg: ConvNeXtConfig | ConvNeXtIsotropicConfig
    grad_checkpointing = False
    fused = False

    def init_weights(self) -> None:
        self.apply(_init_weights)
        if isinstance(getattr(self, "head", None), Head) and isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(self.cfg.head_init_scale)
                self.head.fc.bias.mul_(self.cfg.head_init_scale)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def num_features(self) -> int:
        return self.head.norm.normalized_shape[0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward (per stage / per block) to save memory."""
        self.grad_checkpointing = enable

    def set_fast_path(self, enable: bool = True) -> None:
        """Compute blocks with `fast.block_forward` (default) or with the textbook op sequence."""
        for m in self.modules():
            if isinstance(m, Block):
                m.fast_path = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one (0 removes it)."""
        _check(num_classes >= 0, f"num_classes must be >= 0, got {num_classes}")
        fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        ref = next(self.head.norm.parameters())
        self.head.fc = fc.to(device=ref.device, dtype=ref.dtype)
        _init_weights(self.head.fc)
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, C, H, W) features -> (N, num_classes) logits, or (N, C) pooled features."""
        return self.head(x, pre_logits=pre_logits)

    @torch.no_grad()
    def fuse_for_inference(self) -> ConvNeXtClassifierAPI:
        """Fold every block's LN affine, LayerScale and GRN beta into its Linears; returns self in eval mode.

        The fused model computes the same logits (fp32, |diff| <= 1e-4) with fewer parameters and
        graph nodes (what `convnext export` writes). It is one-way: its state dict no longer
        matches the checkpoint layout and it refuses `train()`; keep (or reload) the unfused model
        to train or save checkpoints.
        """
        for m in self.modules():
            if isinstance(m, Block):
                fast.fuse_block(m)
        self.fused = True
        return self.eval()

    def train(self, mode: bool = True) -> ConvNeXtClassifierAPI:
        if mode and self.fused:
            raise RuntimeError("this model was fused for inference (fuse_for_inference) and cannot be trained; "
                               "create it again from its checkpoint to train")
        return super().train(mode)

    def check_input(self, x: torch.Tensor, min_size: int) -> None:
        """A clear error for inputs the network cannot take (cheap; skipped while tracing/exporting)."""
        if fast.capturing_graph():
            return
        c = self.cfg.in_chans
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] < min_size or x.shape[3] < min_size:
            raise ValueError(f"{type(self).__name__} needs inputs of shape (N, {c}, H, W) with H, W >= {min_size}, "
                             f"got {tuple(x.shape)}")

    def _maybe_checkpointed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`module(x)`, recomputed in backward when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)


class ConvNeXt(ConvNeXtClassifierAPI):
    """Hierarchical ConvNeXt (V1 with LayerScale, V2 with GRN).

    With `features_only=True` the head is dropped, stages after the last requested level are not
    built, and `forward` returns the list of stage outputs at `out_indices` (strides 4, 8, 16, 32).
    """

    def __init__(self, cfg: ConvNeXtConfig, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.cfg = cfg
        self.features_only = features_only
        n = len(cfg.depths)
        out_indices = tuple(int(i) for i in out_indices)
        _check(len(out_indices) > 0 and all(-n <= i < n for i in out_indices),
               f"out_indices {out_indices} must index the {n} stages (0..{n - 1})")
        self.out_indices = tuple(sorted({i % n for i in out_indices}))
        num_stages = self.out_indices[-1] + 1 if features_only else n

        self.stem = stem(cfg.in_chans, cfg.dims[0], cfg.patch_size, cfg.norm_eps)
        # Drop-path rate grows linearly with block index over the whole network.
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").split(list(cfg.depths))
        self.stages = nn.Sequential(*[
            Stage(cfg.dims[max(i - 1, 0)], cfg.dims[i], cfg.depths[i], dpr[i].tolist(), cfg.ls_init_value,
                  cfg.use_grn, cfg.norm_eps, downsample=i > 0)
            for i in range(num_stages)
        ])
        self.feature_info = FeatureInfo(
            dict(num_chs=cfg.dims[i], reduction=cfg.patch_size * 2 ** i, module=f"stages.{i}")
            for i in (self.out_indices if features_only else range(n))
        )
        if not features_only:
            self.head = Head(cfg.dims[-1], cfg.num_classes, cfg.norm_eps)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, dims[-1], H/32, W/32)."""
        return self.forward_intermediates(x, (len(self.stages) - 1,))[0]

    def forward_intermediates(self, x: torch.Tensor, indices: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """(N, in_chans, H, W) -> [(N, dims[i], H/(4*2^i), W/(4*2^i)) for i in indices (default: out_indices)]."""
        indices = self.out_indices if indices is None else indices
        self.check_input(x, self.cfg.patch_size * 2 ** (len(self.stages) - 1))  # each downsampling halves
        x = self.stem(x).contiguous(memory_format=torch.channels_last)  # the blocks' (N, H, W, C) views are free
        outs = []
        for i, stage in enumerate(self.stages):
            x = self._maybe_checkpointed(stage, x)
            if i in indices:
                outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))


class ConvNeXtIsotropic(ConvNeXtClassifierAPI):
    """Isotropic ConvNeXt (official `convnext_isotropic.py`): patchify stem, blocks, head."""

    features_only = False

    def __init__(self, cfg: ConvNeXtIsotropicConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[Block(cfg.dim, dp, cfg.ls_init_value, cfg.use_grn, cfg.norm_eps) for dp in dpr])
        self.feature_info = FeatureInfo([dict(num_chs=cfg.dim, reduction=cfg.patch_size, module="blocks")])
        self.head = Head(cfg.dim, cfg.num_classes, cfg.norm_eps)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, dim, H/16, W/16)."""
        self.check_input(x, self.cfg.patch_size)
        x = self.stem(x).contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = self._maybe_checkpointed(block, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- Registered variants: name -> (model class, config). Read-only data. ---------------------------
def _v1(depths, dims):
    return ConvNeXt, ConvNeXtConfig(depths=depths, dims=dims)


def _v2(depths, dims):
    # V2: GRN after the MLP's GELU, and no LayerScale (GRN makes it redundant, V2 paper section 3).
    return ConvNeXt, ConvNeXtConfig(depths=depths, dims=dims, use_grn=True, ls_init_value=None)


def _iso(depth, dim, ls_init_value=None):
    return ConvNeXtIsotropic, ConvNeXtIsotropicConfig(depth=depth, dim=dim, ls_init_value=ls_init_value)


_SMALL, _NANO, _TINY, _DEEP = (2, 2, 6, 2), (2, 2, 8, 2), (3, 3, 9, 3), (3, 3, 27, 3)
_WIDTHS = {"atto": (40, 80, 160, 320), "femto": (48, 96, 192, 384), "pico": (64, 128, 256, 512),
           "nano": (80, 160, 320, 640), "tiny": (96, 192, 384, 768), "small": (96, 192, 384, 768),
           "base": (128, 256, 512, 1024), "large": (192, 384, 768, 1536), "xlarge": (256, 512, 1024, 2048),
           "huge": (352, 704, 1408, 2816)}
_DEPTHS = {"atto": _SMALL, "femto": _SMALL, "pico": _SMALL, "nano": _NANO, "tiny": _TINY}

MODELS: dict[str, tuple[type, ConvNeXtConfig | ConvNeXtIsotropicConfig]] = {
    **{f"convnext_{s}": _v1(_DEPTHS.get(s, _DEEP), _WIDTHS[s])
       for s in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge")},
    # convnextv2_small is timm's (no official weights); the others are the V2 paper's.
    **{f"convnextv2_{s}": _v2(_DEPTHS.get(s, _DEEP), _WIDTHS[s])
       for s in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "huge")},
    # Official isotropic models: LayerScale off for S/B, 1e-6 for L (TRAINING.md).
    "convnext_isotropic_small": _iso(18, 384),
    "convnext_isotropic_base": _iso(18, 768),
    "convnext_isotropic_large": _iso(36, 1024, ls_init_value=1e-6),
}
