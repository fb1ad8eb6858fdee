"""What a tokenizer is judged by: reconstruction (MSE, PSNR, SSIM) and codebook health (usage, perplexity).

All computed from tensors, nothing downloaded. Videos are ``(B, C, T, H, W)`` in [0, 1].

* PSNR: ``10 log10(1 / MSE)`` per clip, averaged over clips (a clip reconstructed exactly counts as 100 dB).
* SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2, per
  frame and channel, averaged; "valid" windows only (frames smaller than the window use the whole frame).
* Codebook usage: the fraction of the FSQ codebook (the product of ``fsq_levels``, per codebook)
  that occurs at least once in the evaluated codes; perplexity: ``exp`` of the entropy of the code
  frequencies (equal to the number of codes for a uniform use, 1 when one code is used everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "codebook_stats", "Reconstruction"]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR in dB of ``y`` against ``x`` (both in [0, 1]), shape ``(B,)``."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, 100.0))


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-clip mean SSIM, shape ``(B,)``."""
    b, c, t, h, w = x.shape
    win = min(window, h, w)
    g = _gaussian(win, sigma if win == window else sigma * win / window)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, win, win).contiguous()

    def frames(v: torch.Tensor) -> torch.Tensor:
        return v.float().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)

    a, r = frames(x), frames(y)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, kernel, groups=c)

    mu_a, mu_r = blur(a), blur(r)
    var_a = blur(a * a) - mu_a**2
    var_r = blur(r * r) - mu_r**2
    cov = blur(a * r) - mu_a * mu_r
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_r + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2))
    return s.reshape(b, t, -1).mean((1, 2))


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage fraction and perplexity of integer ``codes`` in ``[0, codebook_size)``."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "codebook_usage": float((counts > 0).sum()) / codebook_size,
        "codebook_perplexity": float(torch.exp(-(nz * nz.log()).sum())),
        "codes_seen": int(counts.sum()),
    }


class Reconstruction:
    """Accumulates per-clip reconstruction metrics and the codes over an evaluation."""

    def __init__(self, fsq_levels: Sequence[int]) -> None:
        self.codebook_size = math.prod(int(v) for v in fsq_levels)
        self.mse: list[torch.Tensor] = []
        self.psnr: list[torch.Tensor] = []
        self.ssim: list[torch.Tensor] = []
        self.codes: list[torch.Tensor] = []

    def add(self, video: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor) -> None:
        x, y = video.detach().cpu(), recon.detach().cpu().clamp(0, 1)
        self.mse.append((x - y).pow(2).flatten(1).mean(1))
        self.psnr.append(psnr(x, y))
        self.ssim.append(ssim(x, y))
        self.codes.append(codes.detach().cpu())

    def result(self) -> dict[str, float]:
        if not self.mse:
            return {}
        out = {
            "mse": float(torch.cat(self.mse).mean()),
            "psnr": float(torch.cat(self.psnr).mean()),
            "ssim": float(torch.cat(self.ssim).mean()),
        }
        out.update(codebook_stats(torch.cat([c.reshape(-1) for c in self.codes]), self.codebook_size))
        return out
