"""FCMAE: ConvNeXt V2's fully convolutional masked autoencoder (Woo et al., CVPR 2023, section 2), dense.

The official code runs the encoder on MinkowskiEngine sparse tensors (CUDA only). Here the sparse
encoder is emulated densely and exactly: the stem output is zeroed at masked positions and every
operation that could carry information between positions sees only visible ones — the depthwise
conv's input and output, the downsampling conv's input (after its LayerNorm, whose bias would
otherwise write into masked positions) and output, GRN's input (its L2 norm pools over positions)
and each block's output. So the features at visible positions are what the sparse encoder computes,
whatever the masked pixels hold (`tests/test_fcmae.py` replaces them by noise, bitwise).

Masking: a random `mask_ratio` of the `mask_patch_size` patches (32 px, as official; 8 or 16 for
small images), 1 = masked. Each stage sees the mask at its own resolution: upsampled where the stage
is finer than the patches, and where it is coarser a position is visible when any of its children is
(what a sparse strided conv computes). Decoder: `proj` 1x1 to `decoder_dim`, a learnable `mask_token`
at the positions of the last stage with no visible child, `decoder_depth` ConvNeXt V2 blocks, `pred`
1x1 to stride^2 x 3 pixels per position (the whole 32 x 32 region; = patch_size^2 x 3 as official
when patches are 32 px); the loss is the MSE over the pixels of masked patches only.

One difference from the official code, on purpose: its sparse GRN pools the L2 norm over every
visible position of all images on a GPU (MinkowskiEngine's features are one list for the batch), so
its results depend on the per-GPU batch; here GRN pools per image, as the dense V2 model does when
fine-tuned, which makes a 2-process run equal a 1-process run at the same global batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .factory import check_model_name, create_model
from .models.convnext import Block, ConvNeXt, _init_weights

logger = logging.getLogger(__name__)

INITS = ("default", "official")


def random_mask(n: int, grid: tuple[int, int], ratio: float, *, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, gh, gw) float mask, 1 = masked: exactly int(L * (1 - ratio)) of the L patches stay visible
    (the official `gen_random_mask`: argsort of random noise)."""
    gh, gw = grid
    length = gh * gw
    keep = int(length * (1 - ratio))
    noise = torch.rand(n, length, generator=generator, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)  # each patch's place in a random order
    return (rank >= keep).float().reshape(n, gh, gw)


def visible_at(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, h, w) 1/0 map of the positions of an (h, w) feature map that see at least one visible patch."""
    gh, gw = mask.shape[-2:]
    keep = 1.0 - mask[:, None].float()
    h, w = size
    if h >= gh:  # the map is finer than the patches: each patch covers (h/gh) x (w/gw) positions
        return keep.repeat_interleave(h // gh, dim=2).repeat_interleave(w // gw, dim=3)
    return F.max_pool2d(keep, (gh // h, gw // w))  # coarser: visible when any child is


def masked_block(block: Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A ConvNeXt block as the sparse encoder computes it: `block.forward`'s ops with the re-masking."""
    keep = keep.to(x.dtype)
    shortcut = x
    x = block.dwconv(x) * keep  # sparse conv: outputs at visible positions only, from visible inputs only
    x = x.permute(0, 2, 3, 1)
    keep_last = keep.permute(0, 2, 3, 1)
    x = block.norm(x)
    x = block.pwconv1(x)
    x = block.act(x)
    if not isinstance(block.grn, nn.Identity):
        x = block.grn(x * keep_last) * keep_last  # GRN's norm pools over visible positions; its beta adds everywhere
    x = block.pwconv2(x)
    if block.gamma is not None:
        x = block.gamma * x
    x = x.permute(0, 3, 1, 2)
    return (shortcut + block.drop_path(x)) * keep


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch as (row, column, channel) like the official `patchify`."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


class FCMAE(nn.Module):
    """Masked autoencoder on a ConvNeXt encoder; `forward(imgs, mask=None) -> (loss, pred, mask)` as the official."""

    def __init__(self, encoder: ConvNeXt, *, mask_ratio: float = 0.6, mask_patch_size: int = 32,
                 decoder_dim: int = 512, decoder_depth: int = 1, norm_pix_loss: bool = False) -> None:
        super().__init__()
        cfg = encoder.cfg
        self.stride = cfg.patch_size * 2 ** (len(cfg.depths) - 1)  # 32: the last stage's resolution
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if mask_patch_size % cfg.patch_size or self.stride % mask_patch_size:
            sizes = [s for s in range(cfg.patch_size, self.stride + 1, cfg.patch_size) if self.stride % s == 0]
            raise ValueError(f"mask_patch_size must be a multiple of the stem stride ({cfg.patch_size}) that divides "
                             f"{self.stride}: one of {', '.join(map(str, sizes))}; got {mask_patch_size}")
        if decoder_dim < 1 or decoder_depth < 0:
            raise ValueError(f"decoder_dim must be >= 1 and decoder_depth >= 0, got {decoder_dim}, {decoder_depth}")
        self.encoder = encoder
        self.mask_ratio, self.patch_size, self.norm_pix_loss = mask_ratio, mask_patch_size, norm_pix_loss
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth
        self.in_chans = cfg.in_chans
        self.proj = nn.Conv2d(cfg.dims[-1], decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_dim, 0.0, ls_init_value=None, use_grn=True, eps=cfg.norm_eps)
                                       for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, self.stride ** 2 * cfg.in_chans, kernel_size=1)
        for m in (self.proj, self.decoder, self.pred):
            m.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def model_name(self) -> str | None:
        return getattr(self.encoder, "model_name", None)

    def spec(self) -> dict:
        """What rebuilds this model (saved with its checkpoints)."""
        return {"model_name": self.model_name, "mask_ratio": self.mask_ratio, "mask_patch_size": self.patch_size,
                "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                "norm_pix_loss": self.norm_pix_loss, "in_chans": self.in_chans}

    def check_input(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans or imgs.shape[2] % self.stride or imgs.shape[3] % self.stride:
            raise ValueError(f"FCMAE needs (N, {self.in_chans}, H, W) images with H and W multiples of {self.stride}, "
                             f"got {tuple(imgs.shape)}")

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        return imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size

    def random_mask(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_mask(imgs.shape[0], self.grid(imgs), self.mask_ratio, generator=generator, device=imgs.device)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The sparse encoder, densely: (N, C, H, W), (N, H/p, W/p) -> (N, dims[-1], H/32, W/32), zero where masked."""
        self.check_input(imgs)
        if tuple(mask.shape) != (imgs.shape[0], *self.grid(imgs)):
            raise ValueError(f"mask must be (N, H/{self.patch_size}, W/{self.patch_size}) = "
                             f"{(imgs.shape[0], *self.grid(imgs))}, got {tuple(mask.shape)}")
        enc = self.encoder
        x = enc.stem(imgs).contiguous(memory_format=torch.channels_last)
        keep = visible_at(mask, x.shape[-2:])
        x = x * keep.to(x.dtype)
        for stage in enc.stages:
            if not isinstance(stage.downsample, nn.Identity):
                x = stage.downsample.norm(x) * keep.to(x.dtype)  # masked positions do not exist for the conv
                x = stage.downsample.conv(x)
                keep = visible_at(mask, x.shape[-2:])
                x = x * keep.to(x.dtype)
            for block in stage.blocks:
                x = enc._maybe_checkpointed(lambda t, b=block, k=keep: masked_block(b, t, k), x)
        return x

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder features -> (N, stride^2 * C, H/32, W/32) predicted pixels; the mask token where nothing is visible."""
        x = self.proj(x)
        hidden = 1.0 - visible_at(mask, x.shape[-2:]).to(x.dtype)
        x = x * (1.0 - hidden) + self.mask_token.to(x.dtype) * hidden
        return self.pred(self.decoder(x))

    def unpatchify(self, pred: torch.Tensor) -> torch.Tensor:
        """(N, s*s*C, h, w) predictions -> (N, C, h*s, w*s) image (channels as (row, column, channel), official)."""
        n, _, h, w = pred.shape
        s, c = self.stride, self.in_chans
        return pred.reshape(n, s, s, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, h * s, w * s)

    def patch_losses(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """(N, L) mean squared error of each mask patch (against normalised pixels with norm_pix_loss), in fp32."""
        p = self.patch_size
        target = patchify(imgs.float(), p)
        if self.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return ((patchify(self.unpatchify(pred.float()), p) - target) ** 2).mean(dim=-1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the patch losses over masked patches only."""
        m = mask.flatten(1).float()
        return (self.patch_losses(imgs, pred) * m).sum() / m.sum()

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if mask is None:
            self.check_input(imgs)
            mask = self.random_mask(imgs)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The prediction as an image in the input's units (with norm_pix_loss: each patch de-normalised
        with the true patch's mean and variance, as MAE's visualisation)."""
        if not self.norm_pix_loss:
            return self.unpatchify(pred.float())
        p, (n, c, h, w) = self.patch_size, imgs.shape
        target = patchify(imgs.float(), p)
        rec = patchify(self.unpatchify(pred.float()), p)
        rec = rec * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        rec = rec.reshape(n, h // p, w // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", rec).reshape(n, c, h, w)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def init_official(model: FCMAE) -> None:
    """The official FCMAE initialisation, exactly: its `_init_weights` calls timm's trunc_normal_ without a
    std (so std 1, bounds +-2) on the Minkowski depthwise kernels and Linears and on every Conv2d (stem,
    proj, pred, decoder dwconv); the downsampling convs keep std .02; the decoder's Linears keep torch's
    default init; LayerNorms 1/0; GRN 0; mask token N(0, .02)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            in_encoder = name.startswith("encoder.")
            if isinstance(m, nn.Conv2d):
                if in_encoder and ".downsample.conv" in name:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                else:
                    nn.init.trunc_normal_(m.weight.view(m.weight.shape[0], -1), std=1.0, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and in_encoder:
                nn.init.trunc_normal_(m.weight, std=1.0, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):  # the decoder's: not touched by the official _init_weights
                m.reset_parameters()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(model.mask_token, std=0.02)


def create_fcmae(name: str, *, mask_ratio: float = 0.6, mask_patch_size: int = 32, decoder_dim: int = 512,
                 decoder_depth: int = 1, norm_pix_loss: bool = False,
                 pretrained: str | os.PathLike | Mapping | None = None, init: str = "default",
                 drop_path_rate: float = 0.0, in_chans: int = 3) -> FCMAE:
    """The FCMAE pre-training model on a registered hierarchical ConvNeXt (`convnextv2_atto` ... `huge`).

    `pretrained`: a full pre-training model (ours: a run's last.pt or best.safetensors; official FCMAE
    `convnextv2_*_1k_224_fcmae.pt`) loads strictly, encoder and decoder; any checkpoint `create_model`
    loads (a plain encoder or classifier) initialises the encoder only, and says so. `init`: "default"
    (the encoder's own init, truncated normal std .02 for the decoder) or "official" (`init_official`).
    `model.encoder` is a plain `create_model(name, features_only=True)` model: fine-tune it, or load the
    checkpoint with `create_model(name, pretrained=...)`.
    """
    arch = check_model_name(name)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    from .models.convnext import MODELS

    if not hasattr(MODELS[arch][1], "depths"):
        raise ValueError(f"FCMAE needs a hierarchical ConvNeXt (convnextv2_*); {arch} is isotropic")
    n = len(MODELS[arch][1].depths)
    encoder = create_model(arch, features_only=True, out_indices=(n - 1,), drop_path_rate=drop_path_rate,
                           in_chans=in_chans)
    model = FCMAE(encoder, mask_ratio=mask_ratio, mask_patch_size=mask_patch_size, decoder_dim=decoder_dim,
                  decoder_depth=decoder_depth, norm_pix_loss=norm_pix_loss)
    if init == "official":
        init_official(model)
    if pretrained is not None:
        load_fcmae(model, pretrained)
    return model


def load_fcmae(model: FCMAE, src: str | os.PathLike | Mapping) -> str:
    """Load a full pre-training model (ours or official, strictly) or, from any other checkpoint, the encoder."""
    from .weights import CheckpointError, read_model_file, to_ours, unwrap
    from .weights.convert import fcmae_from_official
    from .weights.loading import load_state_dict_into

    if isinstance(src, Mapping):
        sd, where = unwrap(src), "the state dict"
    else:
        file = read_model_file(src)
        sd, where = file.state_dict(), file.path
    if "mask_token" in sd:
        full = sd if "encoder.stem.conv.weight" in sd else fcmae_from_official(sd)
        target = model.state_dict()
        bad = sorted(f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in full.items()
                     if k in target and v.shape != target[k].shape)
        missing, unexpected = sorted(set(target) - set(full)), sorted(set(full) - set(target))
        if bad or missing or unexpected:
            raise CheckpointError(f"{where} does not fit this FCMAE model ({model.model_name}, decoder "
                                  f"{model.decoder_dim}x{model.decoder_depth}, {model.stride}-px prediction): "
                                  + "; ".join(f"{what} {len(keys)}: {', '.join(keys[:4])}" for what, keys in
                                              (("shape mismatch", bad), ("missing", missing),
                                               ("unexpected", unexpected)) if keys))
        model.load_state_dict(full)
        return "fcmae"
    fmt, enc = to_ours(sd)
    load_state_dict_into(model.encoder, enc)
    logger.info("%s: %s weights loaded into the encoder; the decoder starts fresh", where, fmt)
    return fmt


SPEC_KEYS = ("mask_ratio", "mask_patch_size", "decoder_dim", "decoder_depth", "norm_pix_loss", "in_chans")


def load_fcmae_file(src, *, key: str | None = None) -> FCMAE:
    """The pre-training model a file's spec describes (ours: `convnext pretrain`'s last.pt / best.safetensors;
    an official FCMAE file: its encoder's name and the official decoder), weights loaded, in eval mode."""
    from .weights import CheckpointError, read_model_file

    file = read_model_file(src)
    if file.task != "pretrain":
        raise CheckpointError(f"{file.path} holds a {file.task} model, not an FCMAE pre-training model: "
                              f"use `convnext {file.task} eval|predict`")
    if not file.model_name:
        raise CheckpointError(f"{file.path}: cannot tell which encoder this FCMAE model has")
    sd = file.state_dict(key)
    settings = _decoder_of(sd) | {k: file.spec[k] for k in SPEC_KEYS if k in file.spec}
    try:
        model = create_fcmae(file.model_name, **settings)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file.path}: its header's spec does not describe an FCMAE model ({e})") from None
    load_fcmae(model, sd)
    return model.eval()


def _decoder_of(sd: Mapping) -> dict:
    """The decoder's width and depth as a state dict holds them (files without our spec: the official ones)."""
    if "proj.weight" not in sd:
        return {}
    blocks = {k.split(".")[1] for k in sd if k.startswith("decoder.")}
    return {"decoder_dim": sd["proj.weight"].shape[0], "decoder_depth": len(blocks)}


__all__ = ["FCMAE", "create_fcmae", "init_official", "load_fcmae", "load_fcmae_file", "masked_block", "patchify", "random_mask",
           "visible_at"]
