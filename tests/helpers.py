"""Shared test helpers."""

import torch


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its init so parity tests exercise LayerScale, GRN, biases and norms."""
    g = torch.Generator().manual_seed(1234)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()
