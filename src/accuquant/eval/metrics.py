"""Image-quality metrics on tensors: Frechet distance (and its bootstrap interval), Inception
Score, PSNR, SSIM.

Images are ``(N, C, H, W)`` floats in [0, 1]. Features are ``(N, D)``.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

#: Per-image PSNR is capped here when averaging, so one identical pair does not make the
#: mean infinite; a set whose pairs are all identical has infinite PSNR.
PSNR_CAP_DB = 100.0


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of features ``(N, D)`` (or of each of a batch ``(B, N, D)``)."""
    f = feats.double()
    mu = f.mean(-2)
    c = f - mu.unsqueeze(-2)
    return mu, c.mT @ c / max(1, f.shape[-2] - 1)


def _frechet(mu1, s1, mu2, s2) -> torch.Tensor:
    """The distance of :func:`frechet_distance` in float64, for one pair of statistics or for
    each of a batch (leading dimensions), unclamped."""
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt().unsqueeze(-2)) @ v.mT
    m = root1 @ s2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((m + m.mT) / 2).clamp(min=0).sqrt().sum(-1)
    trace = lambda s: s.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    return (mu1 - mu2).pow(2).sum(-1) + trace(s1) + trace(s2) - 2 * tr_sqrt


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al., 2017).

    The trace of the matrix square root is computed as the sum of square roots of the
    eigenvalues of ``S1^(1/2) S2 S1^(1/2)``, which is symmetric positive semi-definite.
    """
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    if not all(torch.isfinite(t).all() for t in (mu1, s1, mu2, s2)):
        return math.nan  # NaN or inf features: a diverged model
    d = _frechet(mu1, s1, mu2, s2).item()
    return max(0.0, d) if math.isfinite(d) else math.nan  # NaN features (a diverged model) give NaN


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def fid_bootstrap(a: torch.Tensor, b: torch.Tensor, resamples: int = 200, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """An interval for the Frechet distance between the paired feature sets ``a`` and ``b``:
    the distance plus and minus the normal quantile at ``level`` times its bootstrap standard
    deviation, over ``resamples`` draws of the pairs with replacement (the same draw in both
    sets, as the samples are paired by seed), clamped at 0. FID near zero moves with the
    sample drawn more than between good recipes; the interval says by how much at this size.
    (The resampled distances themselves sit above the distance, as repeated samples shrink the
    covariances' effective size, so their percentiles would not contain it.)"""
    if len(a) != len(b):
        raise ValueError(f"fid_bootstrap: paired sets differ in size ({len(a)} and {len(b)})")
    fid = fid_from_features(a, b)
    if math.isnan(fid):
        return math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    fids = []
    for draws in torch.randint(len(a), (resamples, len(a)), generator=g).split(25):
        stats = [feature_stats(f.double()[draws]) for f in (a, b)]  # 25 draws at a time
        fids += _frechet(*stats[0], *stats[1]).clamp(min=0).tolist()
    half = statistics.NormalDist().inv_cdf((1 + level) / 2) * statistics.stdev(fids)
    return max(0.0, fid - half), fid + half


def inception_score(logits: torch.Tensor, splits: int = 1) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` from classifier logits, averaged over ``splits`` parts."""
    p = logits.double().softmax(-1)
    scores = []
    for part in p.chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(kl.exp().item())
    return sum(scores) / len(scores)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1 (``inf`` for identical images)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR, each capped at :data:`PSNR_CAP_DB`; ``inf`` if every pair is identical."""
    p = psnr(a, b)
    if torch.isinf(p).all():
        return math.inf
    return p.clamp(max=PSNR_CAP_DB).mean().item()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al., 2004), Gaussian window, data range 1, averaged over channels."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(x):
        return F.conv2d(x, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a**2
    s_bb = blur(b * b) - mu_b**2
    s_ab = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)
    return (num / den).flatten(1).mean(1)
