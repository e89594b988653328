"""A model saved by the release before the backend refactor (``tests/data/legacy-w4a8``,
made by ``tests/data/make_legacy_model.py``) loads exactly and computes what it computed.

What is exact on every CPU is tested bit for bit against the saved files: the integer
weight codes, step sizes and zero points, the float tensors, the shortcut splits, which
layers and attention modules are quantized, and the weights the fake backend dequantizes
once at load (``(q - z) * s`` is one correctly rounded product per element).

Float outputs are not portable: sums are ordered by the CPU's vector instructions, and
on this random model a last-bit difference moves some 8-bit activation codes by one step,
which then spreads (the two stored references, both computed by the old release on CPUs
reporting different capabilities, differ by 1.6 % of the denoiser output's L2 norm and
10 % of the 5-step trajectory's). So the outputs are tested

* bit for bit against a reference computed here, on this CPU, by an independent
  plain-torch model built from the stored files (diffusers' UNet with the dequantized
  weights, its layer inputs and attention matmul inputs fake-quantized by hooks and a
  plain processor, no accuquant code), and
* against the old release's stored outputs, to the tolerances below.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import accuquant as aq
from accuquant.backends.base import FakeQuantLayer, LayerSpec
from accuquant.quant.attention import QuantAttnProcessor
from accuquant.quant.layers import QuantLayer, quant_layers
from accuquant.quant.quantizers import UniformQuantizer

DATA = Path(__file__).parent / "data"
MODEL = DATA / "legacy-w4a8"
#: the old release's outputs on two CPUs (an AVX2 and an AVX512 one)
REFERENCES = ("legacy-w4a8-reference.safetensors", "legacy-w4a8-reference-AVX512.safetensors")
#: Relative L2 error allowed against the old release's stored outputs, for the denoiser
#: output and the trajectory. Measured across CPUs (the two references against each other,
#: and this code run with ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA set to other
#: instruction sets): up to 0.017 and 0.136; with every conv, linear and group norm output
#: moved by up to 2 ulp at random (80 draws): up to 0.025 and 0.187. A fault in the format's
#: meaning puts the denoiser output above its bound: the probabilities or Q, K and V left
#: unquantized (0.036), a split layer's input quantized on one grid (0.038), the codes read
#: without their zero points (1.58); the trajectory's bound only catches gross faults.
RTOL_OUT, RTOL_TRAJECTORY = 0.03, 0.25


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (bit-for-bit comparison, -0.0 and NaN payloads included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ the stored files, read here
def _int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _unpack(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    """Format 1's codes ``q - qmin``: ``8 // slot`` per byte, the first in the low bits."""
    slot = 2 if bits <= 2 else 4 if bits <= 4 else 8
    p = packed.to(torch.int32)
    parts = torch.stack([(p >> (slot * k)) & ((1 << slot) - 1) for k in range(8 // slot)], dim=1).reshape(-1)
    n = torch.Size(shape).numel()
    return parts[:n].to(torch.uint8).reshape(shape)


@pytest.fixture(scope="module")
def stored():
    """``(meta, tensors)``: ``accuquant.json`` and the denoiser's tensors by state-dict key,
    the per-tensor scalars unpacked and the weight codes unpacked to ``q - qmin`` (uint8)."""
    meta = json.loads((MODEL / "accuquant.json").read_text())
    assert meta["format"] == "accuquant.quantized/1"
    wfile = MODEL / meta["denoiser"] / "accuquant_weights.safetensors"
    with safe_open(str(wfile), "pt") as f:
        md = f.metadata()
    tensors = load_file(str(wfile))
    scalars = tensors.pop("__scalars__")
    names = json.loads(md["scalars"])
    assert scalars.shape == (len(names),)
    tensors.update({k: scalars[i] for i, k in enumerate(names)})
    for key, info in json.loads(md["codes"]).items():
        assert info["bits"] == meta["config"]["weight_bits"]
        tensors[key] = _unpack(tensors[key], info["bits"], info["shape"])
    return meta, tensors


@pytest.fixture(scope="module")
def references():
    out = []
    for name in REFERENCES:
        with safe_open(str(DATA / name), "pt") as f:
            md = f.metadata()
        out.append((name, load_file(str(DATA / name)), md))
    return out


@pytest.fixture
def one_thread():
    """The references' thread count (float sums depend on it; both computations here use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weight_grids(tensors, name: str, split: int | None):
    """``(scale, zero_point)`` of each part of layer ``name``'s weight."""
    n = 1 if split is None else 2
    return [(tensors[f"{name}.weight_quant.{i}.scale"], tensors[f"{name}.weight_quant.{i}.zero_point"].float())
            for i in range(n)]


def _dequantize(meta, tensors, name: str) -> torch.Tensor:
    """Layer ``name``'s float weight from its stored codes: ``(q - z) * s`` per part."""
    c = meta["config"]
    qmin, _ = _int_range(c["weight_bits"], c["weight_symmetric"])
    split = meta["splits"].get(name)
    q = tensors[f"{name}.weight_codes"].to(torch.float32) + qmin
    parts = [q] if split is None else [q[:, :split], q[:, split:]]
    return torch.cat([(p - z) * s for p, (s, z) in zip(parts, _weight_grids(tensors, name, split))], dim=1)


# ------------------------------------------------------------------ the plain-torch reference
def _fake_quant(x: torch.Tensor, grid) -> torch.Tensor:
    s, z, qmin, qmax = grid
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def _act_grid(meta, tensors, prefix: str, bits: int | None = None, symmetric: bool | None = None):
    c = meta["config"]
    bits = c["act_bits"] if bits is None else bits
    qmin, qmax = _int_range(bits, c["act_symmetric"] if symmetric is None else symmetric)
    return tensors[f"{prefix}.scale"], tensors[f"{prefix}.zero_point"].float(), qmin, qmax


def _input_hook(grids, split: int | None, channel_dim: int):
    def hook(module, args):
        (x,) = args
        parts = [x] if split is None else list(x.split([split, x.shape[channel_dim] - split], channel_dim))
        parts = [_fake_quant(p, g) for p, g in zip(parts, grids)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=channel_dim),)

    return hook


class _PlainQuantAttention:
    """diffusers' attention of a 2D UNet block with explicit matmuls, Q, K, V and the
    softmax probabilities fake-quantized (what format 1 records for its quantized attention)."""

    def __init__(self, q, k, v, probs):
        self.q, self.k, self.v, self.probs = q, k, v, probs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
        assert hidden_states.ndim == 4 and hidden_states.dtype == torch.float32  # (no upcasting to do)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        query, key, value = (attn.head_to_batch_dim(p(x)) for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key, value = _fake_quant(query, self.q), _fake_quant(key, self.k), _fake_quant(value, self.v)
        probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        x = attn.batch_to_head_dim(torch.matmul(_fake_quant(probs, self.probs), value))
        x = attn.to_out[1](attn.to_out[0](x)).transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            x = x + residual
        return x / attn.rescale_output_factor


def _plain_model(meta, tensors) -> nn.Module:
    """The saved model as plain diffusers modules: the FP tensors loaded, each quantized
    layer's weight dequantized from its codes, its input fake-quantized by a pre-hook."""
    config = json.loads((MODEL / meta["denoiser"] / "config.json").read_text())
    model = getattr(diffusers, meta["denoiser_class"]).from_config(config).eval()
    quantized = meta["report"]["quantized"]
    state = {}
    for name in quantized:
        state[f"{name}.weight"] = _dequantize(meta, tensors, name)
        if f"{name}.module.bias" in tensors:
            state[f"{name}.bias"] = tensors[f"{name}.module.bias"]
        split = meta["splits"].get(name)
        grids = [_act_grid(meta, tensors, f"{name}.input_quant.{i}") for i in range(1 if split is None else 2)]
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_input_hook(grids, split, -1 if isinstance(module, nn.Linear) else 1))
    layer_keys = tuple(f"{n}." for n in quantized)
    attn_keys = tuple(f"{n}.processor." for n in meta["report"]["attention"])
    state.update({k: v for k, v in tensors.items() if not k.startswith(layer_keys + attn_keys)})
    model.load_state_dict(state, strict=True)
    c = meta["config"]
    attn_bits = c["act_bits"] if c["attn_bits"] == "act" else c["attn_bits"]
    probs_bits = c["act_bits"] if c["softmax_bits"] == "act" else c["softmax_bits"]
    for name in meta["report"]["attention"]:
        p = f"{name}.processor"
        qkv = [_act_grid(meta, tensors, f"{p}.{w}_quant", attn_bits) for w in "qkv"]
        probs = _act_grid(meta, tensors, f"{p}.probs_quant", probs_bits, symmetric=False)  # probabilities: unsigned
        model.get_submodule(name).set_processor(_PlainQuantAttention(*qkv, probs))
    return model


def _plain_denoiser(model, meta):
    """Classifier-free guidance over the plain model, as the saved sampling defaults say."""
    g, null = meta["sampling"]["guidance_scale"], meta["sampling"]["null_class"]

    def den(x, t, cond):
        t = torch.as_tensor(t).expand(x.shape[0])
        labels = cond["labels"]
        out = model(torch.cat([x, x]), torch.cat([t, t]),
                    class_labels=torch.cat([torch.full_like(labels, null), labels])).sample
        out_u, out_c = out.chunk(2)
        return out_u + g * (out_c - out_u)

    return den


def _scheduler_config() -> dict:
    return json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())


def _outputs(den, scheduler_config, ref, md):
    cond = aq.Conditions(labels=ref["labels"])
    with torch.no_grad():
        out = den(ref["x"], int(md["timestep"]), cond)
        solver = aq.make_solver(md["solver"], scheduler_config, int(md["steps"]))
        traj = aq.run_trajectory(den, solver, ref["noise"], cond)
    return out, traj


# ------------------------------------------------------------------ tests
def test_legacy_model_loads_its_files_exactly(stored):
    """On any CPU: codes, step sizes, zero points, float tensors, splits, the quantized
    layers and attention modules, and the fake backend's dequantized weights, bit for bit."""
    meta, tensors = stored
    c = meta["config"]
    pipe = aq.load(MODEL, backend="fake")
    model = pipe.model
    layers = quant_layers(model)

    assert list(layers) == meta["report"]["quantized"]
    assert pipe.quant.report.quantized == meta["report"]["quantized"]
    assert {n: layer.split for n, layer in layers.items() if layer.split is not None} == meta["splits"]
    assert pipe.quant.splits == meta["splits"] and len(meta["splits"]) == 4
    for name in meta["report"]["kept_fp"]:
        assert type(model.get_submodule(name)) in (nn.Conv2d, nn.Linear)
        assert _identical(model.get_submodule(name).weight, tensors[f"{name}.weight"])
    attention = [n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor)]
    assert attention == meta["report"]["attention"] == pipe.quant.report.attention and len(attention) == 4
    act = (c["act_bits"], c["act_symmetric"])
    assert (c["attn_bits"], c["softmax_bits"]) == ("act", "act")
    for name in attention:
        quantizers = model.get_submodule(name).processor.quantizers()
        assert {n: (q.bits, q.symmetric) for n, q in quantizers.items()} == \
            {"q_quant": act, "k_quant": act, "v_quant": act, "probs_quant": (c["act_bits"], False)}

    # every saved tensor, and nothing else, in the loaded model's state
    state = model.state_dict()
    assert set(state) == set(tensors)
    for key, saved in tensors.items():
        if key.endswith(".zero_point"):  # saved as uint8
            assert state[key].dtype == torch.float32 and torch.equal(state[key], saved.to(torch.float32)), key
        elif key.endswith(".weight_codes"):  # held packed, as saved
            assert torch.equal(_unpack(state[key], c["weight_bits"], list(saved.shape)), saved), key
        else:
            assert _identical(state[key], saved), key

    wmin, wmax = _int_range(c["weight_bits"], c["weight_symmetric"])
    amin, amax = _int_range(c["act_bits"], c["act_symmetric"])
    for name, layer in layers.items():
        split = meta["splits"].get(name)
        assert [(q.bits, q.symmetric, q.qmin) for q in layer.weight_quant] == \
            [(c["weight_bits"], c["weight_symmetric"], wmin)] * (1 if split is None else 2)
        assert [(q.bits, q.symmetric) for q in layer.input_quant] == \
            [(c["act_bits"], c["act_symmetric"])] * (1 if split is None else 2)
        # the deployable description: codes q and grids, as saved
        spec = layer.spec()
        assert spec.split == split
        assert torch.equal(spec.weight_codes, tensors[f"{name}.weight_codes"].to(torch.int16) + wmin)
        for g, (s, z) in zip(spec.weight_grids, _weight_grids(tensors, name, split), strict=True):
            assert _identical(g.scale, s) and torch.equal(g.zero_point, z) and (g.qmin, g.qmax) == (wmin, wmax)
        assert len(spec.input_grids) == (1 if split is None else 2)
        for i, g in enumerate(spec.input_grids):
            s, z, _, _ = _act_grid(meta, tensors, f"{name}.input_quant.{i}")
            assert _identical(g.scale, s) and torch.equal(g.zero_point, z) and (g.qmin, g.qmax) == (amin, amax)
        # the fake backend dequantized the weight once, at load: exactly (q - z) * s
        assert isinstance(layer.kernel, FakeQuantLayer)
        assert _identical(layer.kernel.weight, _dequantize(meta, tensors, name)), name


def test_legacy_model_loads_bit_identically(stored, references, one_thread, monkeypatch):
    """On this CPU: the loaded model's denoiser output and 5-step trajectory equal, bit for
    bit, those of the plain-torch model built from the stored files; the fake backend
    never dequantizes during a forward."""
    meta, tensors = stored
    _, ref, md = references[0]
    plain = _outputs(_plain_denoiser(_plain_model(meta, tensors), meta), _scheduler_config(), ref, md)

    pipe = aq.load(MODEL, backend="fake")
    den = pipe.denoiser()

    def refuse(*a, **k):
        raise AssertionError("dequantized during a forward")

    for cls, name in ((UniformQuantizer, "from_int"), (LayerSpec, "dequantized_weight")):
        monkeypatch.setattr(cls, name, refuse)
    monkeypatch.setattr(QuantLayer, "weight", property(refuse))
    out, traj = _outputs(den, pipe.scheduler_config, ref, md)
    assert _identical(out, plain[0]), f"denoiser output: max diff {(out - plain[0]).abs().max().item():.3g}"
    assert _identical(traj, plain[1]), f"trajectory: max diff {(traj - plain[1]).abs().max().item():.3g}"


@pytest.mark.parametrize("which", range(len(REFERENCES)), ids=REFERENCES)
def test_legacy_model_matches_the_old_release(stored, references, one_thread, which):
    """The loaded model, and the plain model that anchors the bit-for-bit test above, compute
    the old release's stored outputs up to the CPU-dependent differences (``RTOL_*``)."""
    meta, tensors = stored
    name, ref, md = references[which]
    assert int(md["threads"]) == 1 and (md["solver"], md["steps"]) == ("ddim", "5")
    pipe = aq.load(MODEL, backend="fake")
    for what, den, sched in (("loaded", pipe.denoiser(), pipe.scheduler_config),
                             ("plain", _plain_denoiser(_plain_model(meta, tensors), meta), _scheduler_config())):
        out, traj = _outputs(den, sched, ref, md)
        assert _rel(out, ref["out"]) <= RTOL_OUT, f"{name}, {what}: denoiser output off by {_rel(out, ref['out']):.3f}"
        assert _rel(traj, ref["trajectory"]) <= RTOL_TRAJECTORY, \
            f"{name}, {what}: trajectory off by {_rel(traj, ref['trajectory']):.3f}"
