import pytest
import torch

from accuquant.quant.quantizers import RangeObserver, UniformQuantizer, int_range


@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_range_is_exact(bits):
    # symmetric: as many levels below zero as above; asymmetric: all 2^b levels
    assert int_range(bits, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert int_range(bits, False) == (0, 2**bits - 1)
    x = torch.linspace(-5, 5, 1001)
    q = UniformQuantizer(bits, symmetric=True)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    codes = q.to_int(x)
    assert codes.min().item() == -(2 ** (bits - 1) - 1) and codes.max().item() == 2 ** (bits - 1) - 1
    # a symmetric quantizer clamps both signs at the same magnitude
    assert q(torch.tensor([-5.0]))[0].item() == pytest.approx(-q(torch.tensor([5.0]))[0].item())
    qa = UniformQuantizer(bits, symmetric=False)
    qa.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    codes = qa.to_int(x)
    assert codes.min().item() == 0 and codes.max().item() == 2**bits - 1
    assert len(torch.unique(qa(x))) == 2**bits


def test_round_trip_on_grid_and_zero_exact():
    q = UniformQuantizer(4, symmetric=False)
    q.set_range(torch.tensor(-0.7), torch.tensor(1.6))
    grid = q.from_int(torch.arange(0, 16))
    assert torch.equal(q(grid), grid)  # grid points are fixed points
    assert torch.equal(q.to_int(grid), torch.arange(0, 16, dtype=torch.int16))
    assert q(torch.zeros(3)).abs().max().item() == 0.0  # zero is exactly representable
    x = torch.rand(1000) * 2.3 - 0.7
    assert (q(x) - x).abs().max().item() <= q.scale.item() / 2 + 1e-6


def test_ste_gradient_passes_inside_and_stops_outside():
    q = UniformQuantizer(8, symmetric=True)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.tensor([-3.0, -0.5, 0.1, 0.77, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert q.scale.grad is not None and q.scale.grad.abs().item() > 0  # LSQ step-size gradient


def test_per_channel_axis():
    w = torch.randn(4, 3, 3, 3)
    w[2] *= 10
    q = UniformQuantizer(4, symmetric=True, shape=(4, 1, 1, 1), axis=0)
    q.init_range(w, "minmax")
    s = q.scale.detach().flatten()
    expected = w.abs().amax(dim=(1, 2, 3)) / 7
    assert torch.allclose(s, expected)
    assert s[2] > 5 * s[[0, 1, 3]].max()
    # each channel's error is bounded by its own step
    err = (q(w) - w).abs().amax(dim=(1, 2, 3))
    assert torch.all(err <= s / 2 + 1e-6)


def test_mse_search_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) ** 3
    errs = {}
    for method in ("minmax", "percentile", "mse"):
        q = UniformQuantizer(4, symmetric=False)
        q.init_range(x, method)
        errs[method] = ((q(x) - x) ** 2).mean().item()
    assert errs["mse"] < errs["minmax"]
    assert errs["mse"] <= errs["percentile"] * 1.01


def test_observer_matches_direct_search_and_is_bounded():
    g = torch.Generator().manual_seed(1)
    obs = RangeObserver(max_values=5000, per_update=1000)
    chunks = [torch.randn(4000, generator=g) * (k + 1) for k in range(8)]
    for c in chunks:
        obs.update(c)
    assert obs.count <= 2 * 5000
    allx = torch.cat(chunks)
    assert obs.min == allx.min().item() and obs.max == allx.max().item()
    q = UniformQuantizer(8, symmetric=False)
    obs.apply(q, "minmax")
    q2 = UniformQuantizer(8, symmetric=False)
    q2.init_range(allx, "minmax")
    assert torch.allclose(q.scale, q2.scale)


def test_adaround_starts_at_nearest_rounding_and_learns():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    q = UniformQuantizer(4, symmetric=False, shape=(8, 1), axis=0)
    q.init_range(w, "minmax")
    nearest = q(w).detach()
    q.enable_learned_rounding(w)
    q.soft_rounding = False
    assert torch.equal(q.to_int(w), torch.clamp(torch.round(w / q.scale) + q.zero_point, 0, 15).to(torch.int16))
    assert torch.allclose(q(w), nearest, atol=1e-6)
    q.soft_rounding = True
    loss = ((q(w) - w) ** 2).sum() + 0.01 * q.rounding_regularizer(20.0)
    loss.backward()
    assert q.alpha.grad is not None and q.alpha.grad.abs().sum() > 0


def test_observer_sample_represents_early_and_late_updates_alike():
    obs = RangeObserver(max_values=4000, per_update=1000, seed=0)
    for k in range(40):  # 40 updates, e.g. 40 sampling steps in order
        obs.update(torch.full((5000,), float(k)))
    counts = torch.bincount(obs.values().long(), minlength=40).float()
    assert obs.count == 4000
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_percentile_range_on_a_tensor_larger_than_quantiles_limit():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1 << 24) + 10, generator=g) * 2 - 1  # torch.quantile refuses more than 2^24 values
    q = UniformQuantizer(8, symmetric=True)
    q.init_range(x, "percentile", percentile=99.0)
    assert abs(q.scale.item() * 127 - 0.98) < 0.01


def test_fixed_codes_keep_the_rounding_when_the_step_size_moves():
    """With learned rounding, floor(w / s) + decision re-derives the codes at each step size,
    so a weight crossing a grid point jumps by a whole step; fixed codes only scale."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    q = UniformQuantizer(3, symmetric=True, shape=(8, 1), axis=0)
    q.init_range(w, "minmax")
    q.enable_learned_rounding(w)
    q.alpha.data = torch.where(torch.rand(w.shape, generator=g) < 0.5, -2.0, 2.0)
    q.soft_rounding = False
    codes, before = q.to_int(w), q(w).detach()
    q.fix_codes(w)
    assert q.alpha is None and torch.equal(q.codes, codes) and torch.equal(q(w), before)
    assert "codes" in dict(q.named_buffers()) and "codes" not in q.state_dict()  # follows .to(), not saved there
    with torch.no_grad():
        q.scale.mul_(0.97)
    assert torch.equal(q.to_int(w), codes)
    assert torch.allclose(q(w), before * 0.97, atol=1e-6)  # continuous in the step size
    floor_codes = torch.clamp(torch.floor(w / q.scale) + (codes - torch.floor(w / (q.scale / 0.97))), -3, 3)
    assert (floor_codes != codes).any()  # what re-deriving the codes would have done
    q.scale.grad = None
    (q(w) * w).sum().backward()
    assert torch.allclose(q.scale.grad.squeeze(1), (codes.float() * w).sum(1))  # d/ds of s * codes


@pytest.mark.parametrize("shape", [(), (16, 1, 1, 1)])
def test_fixed_codes_backward_keeps_the_int_codes_and_matches_autograd(shape):
    """With fixed codes the step size's gradient is exactly plain autograd's on
    ``(codes - z) * s``, but the backward pass keeps the int16 codes (already held) instead
    of a float tensor the size of the weight."""
    torch.manual_seed(0)
    w, g = torch.randn(16, 8, 3, 3), torch.randn(16, 8, 3, 3)
    q = UniformQuantizer(4, False, shape, 0 if shape else None)
    q.init_range(w, "minmax")
    q.fix_codes(w)
    q.scale = torch.nn.Parameter(q.scale.detach().clone())
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(w)
    y.backward(g)
    grad, q.scale.grad = q.scale.grad.clone(), None
    ref = (q.codes.to(torch.float32) - q.zero_point) * q.scale
    ref.backward(g)
    assert torch.equal(y, ref) and torch.equal(grad, q.scale.grad) and grad.abs().sum() > 0
    floats = [t for t in saved if t.is_floating_point() and t.numel() == w.numel()]
    assert not floats and any(t.dtype == torch.int16 and t.numel() == w.numel() for t in saved)
