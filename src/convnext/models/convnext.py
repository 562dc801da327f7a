"""ConvNeXt V1 (Liu et al., CVPR 2022) and V2 (Woo et al., CVPR 2023) in one model family.

Reading order, as in the papers: `Block` (dw 7x7 -> LN -> Linear 4C -> GELU [-> GRN] -> Linear C
[-> LayerScale] -> DropPath + residual), `Stage` (optional LN + 2x2/2 downsampling, then blocks),
`ConvNeXt` (4x4/4 patchify stem + LN, four stages, head = global mean pool -> LN -> Linear), and
`ConvNeXtIsotropic` (16x16 patchify stem, one constant-width stack of blocks; paper section 3.3).

The pointwise MLP uses `nn.Linear` parameters on channels-last (N, H, W, C) tensors, as the official
code does; checkpoints of timm's 1x1-conv variants load by reshaping. The forward computes the same
function as the official block, faster: activations stay channels-last after the stem (the NHWC
view is free), LayerScale is folded into `pwconv2`, and in CPU inference the Linears run through
oneDNN with the bias, GELU and residual add fused (`layers.linear`). V1 and V2 differ only in
`use_grn` and `ls_init_value`, so they share every class.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from .layers import GRN, DepthwiseConv2d, DropPath, LayerNorm, LayerNorm2d, linear


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
        _check(len(self.depths) == len(self.dims) and len(self.depths) >= 1,
               f"depths {self.depths} and dims {self.dims} must be non-empty and of equal length")
        _check(all(d >= 1 for d in self.depths) and all(c >= 1 for c in self.dims),
               f"depths {self.depths} and dims {self.dims} must be positive")
        _check(self.in_chans >= 1, f"in_chans must be >= 1, got {self.in_chans}")
        _check(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        _check(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _check(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")


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
        _check(self.in_chans >= 1, f"in_chans must be >= 1, got {self.in_chans}")
        _check(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        _check(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


class Block(nn.Module):
    """ConvNeXt block: (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float | None = 1e-6,
                 use_grn: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = DepthwiseConv2d(dim, kernel_size=7)  # 7x7 depthwise: the spatial mixing, like attention
        self.norm = LayerNorm(dim, eps=eps)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # inverted bottleneck, expansion 4 like a Transformer MLP
        self.grn = GRN(4 * dim) if use_grn else nn.Identity()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # LayerScale: a per-channel gain that starts near zero so deep stacks start near identity.
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C), a free view of channels-last memory
        x = linear(self.norm(x), self.pwconv1.weight, self.pwconv1.bias, gelu=True)  # exact (erf) GELU
        x = self.grn(x)
        w2, b2 = self.pwconv2.weight, self.pwconv2.bias
        if self.gamma is not None:  # LayerScale folded into the last Linear: g*(Wx + b) = (gW)x + gb
            w2, b2 = self.gamma[:, None] * w2, self.gamma * b2
        if self.drop_path.p > 0 and self.training:
            return shortcut + self.drop_path(linear(x, w2, b2).permute(0, 3, 1, 2))
        return linear(x, w2, b2, residual=shortcut.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N, C, H, W)

    @torch.no_grad()
    def fuse_for_inference(self) -> None:
        """Fold LN's affine into pwconv1, LayerScale and GRN's beta into pwconv2 (same function)."""
        w, b = self.norm.weight, self.norm.bias
        self.pwconv1.bias.add_(self.pwconv1.weight @ b)  # W1 (xhat*w + b) + b1 = (W1 diag w) xhat + (W1 b + b1)
        self.pwconv1.weight.mul_(w)
        self.norm = LayerNorm(self.norm.normalized_shape, eps=self.norm.eps, elementwise_affine=False)
        if isinstance(self.grn, GRN) and self.grn.beta is not None:  # W2 (y + beta) + b2
            self.pwconv2.bias.add_(self.pwconv2.weight @ self.grn.beta)
            self.grn.beta = None
        if self.gamma is not None:
            self.pwconv2.weight.mul_(self.gamma[:, None])
            self.pwconv2.bias.mul_(self.gamma)
            self.gamma = None


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
        self.blocks = nn.Sequential(*[
            Block(dim, drop_paths[j], ls_init_value, use_grn, eps) for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


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


class _Base(nn.Module):
    """What both ConvNeXt families share: the head API, checkpointing flag and initialisation."""

    head: Head
    cfg: ConvNeXtConfig | ConvNeXtIsotropicConfig

    def _init(self) -> None:
        self.apply(_init_weights)
        if isinstance(self.head.fc, nn.Linear):
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
    def fuse_for_inference(self) -> _Base:
        """Fold every block's LN affine, LayerScale and GRN beta into its Linears; returns self in eval mode.

        The fused model computes the same logits (fp32, |diff| <= 1e-4) with fewer parameters and
        graph nodes (what `convnext export` writes); in eager CPU inference the default forward
        already folds LayerScale per call, so the gain there is small (benchmarks/). It is one-way: its state dict no longer matches the checkpoint layout and it
        refuses `train()`; keep (or reload) the unfused model to train or save checkpoints.
        """
        for m in self.modules():
            if isinstance(m, Block):
                m.fuse_for_inference()
        self.fused = True
        return self.eval()

    def train(self, mode: bool = True) -> _Base:
        if mode and getattr(self, "fused", False):
            raise RuntimeError("this model was fused for inference (fuse_for_inference) and cannot be trained; "
                               "create it again from its checkpoint to train")
        return super().train(mode)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)


class ConvNeXt(_Base):
    """Hierarchical ConvNeXt (V1 with LayerScale, V2 with GRN).

    With `features_only=True` the head is dropped, stages after the last requested level are not
    built, and `forward` returns the list of stage outputs at `out_indices` (strides 4, 8, 16, 32).
    """

    def __init__(self, cfg: ConvNeXtConfig, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.features_only = features_only
        n = len(cfg.depths)
        out_indices = tuple(int(i) for i in out_indices)
        _check(len(out_indices) > 0 and all(-n <= i < n for i in out_indices),
               f"out_indices {out_indices} must index the {n} stages (0..{n - 1})")
        self.out_indices = tuple(sorted({i % n for i in out_indices}))
        num_stages = self.out_indices[-1] + 1 if features_only else n

        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(cfg.in_chans, cfg.dims[0], kernel_size=cfg.patch_size, stride=cfg.patch_size),
            norm=LayerNorm2d(cfg.dims[0], eps=cfg.norm_eps),
        ))
        # Drop-path rate grows linearly with block index over the whole network.
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        stages, in_dim, start = [], cfg.dims[0], 0
        for i in range(num_stages):
            stages.append(Stage(in_dim, cfg.dims[i], cfg.depths[i], dpr[start:start + cfg.depths[i]],
                                cfg.ls_init_value, cfg.use_grn, cfg.norm_eps, downsample=i > 0))
            in_dim, start = cfg.dims[i], start + cfg.depths[i]
        self.stages = nn.Sequential(*stages)
        self.feature_info = FeatureInfo(
            dict(num_chs=cfg.dims[i], reduction=cfg.patch_size * 2 ** i, module=f"stages.{i}")
            for i in (self.out_indices if features_only else range(n))
        )
        if not features_only:
            self.head = Head(cfg.dims[-1], cfg.num_classes, cfg.norm_eps)
        self._init()

    def _init(self) -> None:
        if self.features_only:
            self.apply(_init_weights)
        else:
            super()._init()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, dims[-1], H/32, W/32)."""
        x = self.stem(x).contiguous(memory_format=torch.channels_last)  # (N, H, W, C) views are free
        for stage in self.stages:
            x = self._run(stage, x)
        return x

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, in_chans, H, W) -> [(N, dims[i], H/(4*2^i), W/(4*2^i)) for i in out_indices]."""
        x = self.stem(x).contiguous(memory_format=torch.channels_last)
        outs = []
        for i, stage in enumerate(self.stages):
            x = self._run(stage, x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))


class ConvNeXtIsotropic(_Base):
    """Isotropic ConvNeXt (official `convnext_isotropic.py`): patchify stem, blocks, head."""

    def __init__(self, cfg: ConvNeXtIsotropicConfig, features_only: bool = False,
                 out_indices: tuple[int, ...] = ()) -> None:
        super().__init__()
        _check(not features_only, "features_only needs a hierarchical ConvNeXt; isotropic models have one scale")
        self.cfg = cfg
        self.grad_checkpointing = False
        self.features_only = False
        self.stem = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            Block(cfg.dim, dpr[j], cfg.ls_init_value, cfg.use_grn, cfg.norm_eps) for j in range(cfg.depth)
        ])
        self.feature_info = FeatureInfo([dict(num_chs=cfg.dim, reduction=cfg.patch_size, module="blocks")])
        self.head = Head(cfg.dim, cfg.num_classes, cfg.norm_eps)
        self._init()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, dim, H/16, W/16)."""
        x = self.stem(x).contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = self._run(block, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
