import math

import pytest
import torch

from accuquant.eval.metrics import (fid_bootstrap, fid_from_features, frechet_distance, inception_score, mean_psnr,
                                    psnr, ssim)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g)
    assert fid_from_features(a, a) < 1e-6
    b = torch.randn(2000, 16, generator=g)
    same_dist = fid_from_features(a, b)
    shifted = fid_from_features(a, b + 1.0)
    assert same_dist < 0.5
    assert abs(shifted - (16 + same_dist)) < 1.0  # |mu1 - mu2|^2 = 16


def test_frechet_distance_of_gaussians_in_closed_form():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    d = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[1.0]]))
    assert math.isclose(d, 4 + 4 + 1 - 2 * 2, rel_tol=1e-9)


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(10, 1) * 50  # every class, confidently
    assert math.isclose(inception_score(confident), 10.0, rel_tol=1e-6)
    assert math.isclose(inception_score(torch.zeros(100, 10)), 1.0, rel_tol=1e-9)
    one_class = torch.zeros(100, 10)
    one_class[:, 3] = 50
    assert inception_score(one_class) < 1.001


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=g)
    assert torch.isinf(psnr(x, x)).all() and mean_psnr(x, x) == math.inf
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    y = (x + 0.1).clamp(0, 1)
    assert 15 < mean_psnr(x, y) < 25
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert mean_psnr(x, noisy) > mean_psnr(x, noisier)
    assert (ssim(x, noisy) > ssim(x, noisier)).all()
    assert (ssim(x, noisier) < 0.9).all()
    # an identical pair among others does not make the mean infinite
    mixed = torch.cat([x[:1], noisy[1:]])
    assert math.isfinite(mean_psnr(x, mixed))


def test_nan_features_give_nan_not_zero():
    from accuquant.eval.evaluation import to_json_safe

    a = torch.randn(100, 4)
    b = a.clone()
    b[0, 0] = float("nan")
    assert math.isnan(fid_from_features(a, b))
    safe = to_json_safe({"fid2fp": math.nan, "psnr": 20.0})
    assert safe["fid2fp"] is None and safe["psnr"] == 20.0


def test_the_bootstrap_interval_holds_the_fid_and_narrows_with_the_sample():
    torch.manual_seed(0)
    widths = {}
    for n in (250, 1000):
        a = torch.randn(n, 16)
        b = a + 0.3 * torch.randn(n, 16) + 0.1
        fid = fid_from_features(a, b)
        lo, hi = fid_bootstrap(a, b, resamples=100)
        assert 0 < lo < fid < hi and fid_bootstrap(a, b, resamples=100) == (lo, hi)  # seeded
        widths[n] = hi - lo
    assert 0.35 < widths[1000] / widths[250] < 0.7  # about 1 / sqrt(4)
    with pytest.raises(ValueError):
        fid_bootstrap(torch.randn(5, 4), torch.randn(6, 4))
    nan = torch.full((8, 4), float("nan"))
    assert all(math.isnan(v) for v in fid_bootstrap(nan, nan))
