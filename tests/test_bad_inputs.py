"""Every kind of bad input the command line refuses: one line on stderr, exit status 2, no
traceback, and nothing written (no output, no temporary file left beside it).

``CASES`` is the list the README's table gives (a test checks that the two agree): an id,
what is wrong, and the part of the message that the user sees.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from accuquant.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


class Ctx:
    """The models a case needs, built on first use in the test's own folder."""

    def __init__(self, tmp: Path, request):
        self.tmp, self.request = tmp, request
        self.out = tmp / "out"  # the output every case names; it must not appear
        self.grid = tmp / "grid.png"

    def fixture(self, name: str) -> Path:
        return self.request.getfixturevalue(name)

    def copy(self, name: str) -> Path:
        """A copy of a fixture model, to damage."""
        dst = self.tmp / f"{name}-copy"
        if not dst.exists():
            shutil.copytree(self.fixture(name), dst)
        return dst

    def quantized(self) -> Path:
        q = self.tmp / "quantized"
        if not q.exists():
            code = main(quantize(self.fixture("tiny_pipeline_dir"), q))
            assert code == 0
        return q

    def calib(self, fixture: str = "tiny_pipeline_dir", *extra) -> Path:
        """A saved calibration set of a fixture model (4 DDIM steps unless ``extra`` says)."""
        cache = Path(os.environ["ACCUQUANT_CACHE"]) / "calib"
        before = set(cache.glob("*.safetensors")) if cache.exists() else set()
        assert main(quantize(self.fixture(fixture), self.tmp / f"q-{len(before)}", *extra)) == 0
        (new,) = set(cache.glob("*.safetensors")) - before
        return new


def quantize(model, out, *extra) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "naive", "--weight-bits", "4", "--act-bits", "8",
            "--steps", "4", "--scheduler", "ddim", "--calib-samples", "4", "--summary", "0", "--out", str(out),
            "--quiet", *map(str, extra)]


def sample(model, out, *extra) -> list[str]:
    return ["sample", "--model", str(model), "--num", "2", "--steps", "2", "--out", str(out), "--quiet",
            *map(str, extra)]


def _edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


# --------------------------------------------------------------------------- the cases
def config_missing_key(c):
    m = c.copy("tiny_pipeline_dir")
    _edit_json(m / "unet" / "config.json", lambda d: d.pop("block_out_channels"))
    return quantize(m, c.out)


def config_wrong_type(c):
    m = c.copy("tiny_pipeline_dir")
    _edit_json(m / "unet" / "config.json", lambda d: d.update(layers_per_block="two"))
    return quantize(m, c.out)


def truncated_json(c):
    m = c.copy("tiny_pipeline_dir")
    (m / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "unet": [')
    return quantize(m, c.out)


def non_utf8_json(c):
    m = c.copy("digit_pipeline_dir")
    (m / "accuquant_sampling.json").write_bytes(b'{"guidance_scale": "\xff\xfe"}')
    return quantize(m, c.out)


def sampling_defaults_wrong_type(c):
    m = c.copy("digit_pipeline_dir")
    _edit_json(m / "accuquant_sampling.json", lambda d: d.update(guidance_scale="high"))
    return quantize(m, c.out)


def scheduler_config_wrong_type(c):
    m = c.copy("tiny_pipeline_dir")
    _edit_json(m / "scheduler" / "scheduler_config.json", lambda d: d.update(num_train_timesteps="many"))
    return quantize(m, c.out)


def symlink_loop(c):
    loop = c.tmp / "loop"
    os.symlink(loop, loop)
    return quantize(loop, c.out)


def not_a_model(c):
    (c.tmp / "notes.txt").write_text("hello")
    return quantize(c.tmp / "notes.txt", c.out)


def truncated_safetensors(c):
    m = c.copy("tiny_pipeline_dir")
    w = m / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return quantize(m, c.out)


def nan_weights(c):
    pipe = diffusers.DDPMPipeline.from_pretrained(str(c.fixture("tiny_pipeline_dir")))
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    pipe.save_pretrained(str(c.tmp / "nan"))
    return quantize(c.tmp / "nan", c.out)


def calib_other_model(c):
    calib = c.calib("digit_pipeline_dir")
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--calib", calib)


def calib_other_scheduler(c):
    calib = c.calib()
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--calib", calib, "--scheduler", "pndm")


def calib_other_steps(c):
    calib = c.calib()
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--calib", calib, "--steps", "5")


def calib_not_trajectories(c):
    save_file({"x": torch.zeros(2)}, str(c.tmp / "other.safetensors"))
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--calib", c.tmp / "other.safetensors")


def newer_format(c):
    q = c.quantized()
    _edit_json(q / "accuquant.json", lambda d: d.update(format="accuquant.quantized/99"))
    return sample(q, c.grid)


def newer_method_version(c):
    q = c.quantized()
    _edit_json(q / "accuquant.json", lambda d: d.update(method_version=99))
    return sample(q, c.grid)


def _tamper(c, change):
    q = c.quantized()
    f = q / "unet" / "accuquant_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        md = h.metadata()
    t = load_file(str(f))
    change(t, md)
    save_file(t, str(f), metadata=md)
    return sample(q, c.grid)


def tampered_code_shape(c):
    def change(t, md):
        codes = json.loads(md["codes"])
        name = next(iter(codes))
        codes[name]["shape"][0] += 1
        md["codes"] = json.dumps(codes)
    return _tamper(c, change)


def tampered_scale_count(c):
    def change(t, md):
        name = next(k for k in t if k.endswith("weight_quant.0.scale") or ("weight" in k and "scale" in k))
        t[name] = t[name].flatten()[:-1].contiguous()
    return _tamper(c, change)


def prompt_to_class_model(c):
    return sample(c.fixture("digit_pipeline_dir"), c.grid, "--prompt", "a seven")


def labels_to_text_model(c):
    return sample(c.fixture("sd_pipeline_dir"), c.grid, "--labels", "3")


def pipeline_missing_text_encoder(c):
    path = c.copy("flux_pipeline_dir")
    _edit_json(path / "model_index.json", lambda d: d.update(text_encoder_2=[None, None]))
    shutil.rmtree(path / "text_encoder_2")
    return ["quantize", "--model", str(path), "--method", "naive", "--steps", "2", "--calib-samples", "2",
            "--summary", "0", "--out", str(c.out), "--quiet"]


def labels_out_of_range(c):
    return sample(c.fixture("digit_pipeline_dir"), c.grid, "--labels", "12")


def zero_num(c):
    return sample(c.fixture("tiny_pipeline_dir"), c.grid, "--num", "0")


def negative_steps(c):
    return sample(c.fixture("tiny_pipeline_dir"), c.grid, "--steps", "-3")


def zero_calib_samples(c):
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--calib-samples", "0")


def negative_batch_size(c):
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--batch-size", "-8")


def too_many_steps(c):
    return sample(c.fixture("tiny_pipeline_dir"), c.grid, "--steps", "2000")


def negative_guidance(c):
    return sample(c.fixture("digit_pipeline_dir"), c.grid, "--guidance-scale", "-1")


def non_finite_guidance(c):
    return sample(c.fixture("digit_pipeline_dir"), c.grid, "--guidance-scale", "nan")


def out_is_a_file(c):
    c.out.write_text("precious")
    return quantize(c.fixture("tiny_pipeline_dir"), c.out)


def out_not_empty(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("precious")
    return quantize(c.fixture("tiny_pipeline_dir"), c.out)


def out_read_only(c):
    # /proc takes no new files, even from root (a chmod'ed folder does not stop root)
    c.out = Path("/proc/accuquant-out")
    return quantize(c.fixture("tiny_pipeline_dir"), c.out)


def grid_not_png(c):
    c.grid = c.tmp / "grid.jpg"
    return sample(c.fixture("tiny_pipeline_dir"), c.grid)


def cuda_without_gpu(c):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--device", "cuda")


def unknown_backend(c):
    return sample(c.quantized(), c.grid, "--backend", "int9")


def gpu_backend_on_the_cpu(c):
    return sample(c.quantized(), c.grid, "--backend", "cuda-int8")


def _lora_file(c, name: str, tensors: dict) -> Path:
    from safetensors.torch import save_file

    path = c.tmp / name
    save_file(tensors, str(path))
    return path


def lora_for_another_model(c):
    f = _lora_file(c, "sdxl-lora.safetensors", {"unet.add_embedding.linear_1.lora_A.weight": torch.zeros(4, 2816),
                                                "unet.add_embedding.linear_1.lora_B.weight": torch.zeros(1280, 4)})
    return sample(c.fixture("tiny_pipeline_dir"), c.grid, "--lora", f)


def lora_rank_not_fitting(c):
    f = _lora_file(c, "lora.safetensors", {"unet.down_blocks.1.attentions.0.to_q.lora_A.weight": torch.zeros(4, 32),
                                           "unet.down_blocks.1.attentions.0.to_q.lora_B.weight": torch.zeros(32, 8)})
    return sample(c.quantized(), c.grid, "--lora", f)


def weight_bits_out_of_range(c):
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--weight-bits", "9")


def unknown_method(c):
    args = quantize(c.fixture("tiny_pipeline_dir"), c.out)
    args[args.index("naive")] = "magic"
    return args


def unknown_correction(c):
    args = quantize(c.fixture("tiny_pipeline_dir"), c.out)
    args[args.index("naive")] = "naive+magic"
    return args


def unknown_scheduler(c):
    return sample(c.fixture("tiny_pipeline_dir"), c.grid, "--scheduler", "euler")


def flag_of_another_method(c):
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--iters", "10")


def bad_memory_size(c):
    return quantize(c.fixture("tiny_pipeline_dir"), c.out, "--max-memory", "lots")


def unreadable_prompt_file(c):
    (c.tmp / "prompts.txt").write_bytes(b"\xff\xfe seven")
    return sample(c.fixture("sd_pipeline_dir"), c.grid, "--prompt-file", c.tmp / "prompts.txt")


def batch_smaller_than_its_pieces(c):
    args = quantize(c.fixture("tiny_pipeline_dir"), c.out, "--batch-size", "2", "--micro-batches", "4")
    args[args.index("naive")] = "accuquant"
    return args


# images of a video model, and frames of an image model
@pytest.fixture
def wan_pipeline_dir(tmp_path):
    """The tiny Wan 2.1 text-to-video pipeline of ``tests/test_family_wan.py``."""
    from tests.test_family_wan import save_wan_pipeline

    return save_wan_pipeline(tmp_path / "tiny-wan")


def sample_grid_of_video_model(c):
    return sample(c.fixture("wan_pipeline_dir"), c.grid)


def evaluate_video_model(c):
    return ["evaluate", "--model", str(c.fixture("wan_pipeline_dir")), "--num", "2", "--steps", "2", "--quiet"]


def analyze_video_model(c):
    c.out, c.grid = c.tmp / "errors.csv", c.tmp / "errors.png"
    return ["analyze", "--model", str(c.fixture("wan_pipeline_dir")), "--out", str(c.tmp / "errors"), "--num", "2",
            "--steps", "2", "--quiet"]


def compare_video_model(c):
    return ["compare", "--model", str(c.fixture("wan_pipeline_dir")), "--out", str(c.out), "--methods", "naive",
            "--bits", "w8a8", "--quiet"]


def quantize_summary_of_video_model(c):
    return ["quantize", "--model", str(c.fixture("wan_pipeline_dir")), "--method", "naive", "--steps", "2",
            "--calib-samples", "2", "--summary", "2", "--out", str(c.out), "--quiet"]


def frames_for_image_model(c):
    m = c.copy("digit_pipeline_dir")
    _edit_json(m / "accuquant_sampling.json", lambda d: d.update(num_frames=4))
    return quantize(m, c.out)


# an output onto the input model: refused before anything is read (the model is left as it was)
def out_is_the_model(c):
    c.out = c.copy("tiny_pipeline_dir")
    return quantize(c.out, c.out, "--overwrite")


def out_inside_the_model(c):
    m = c.copy("tiny_pipeline_dir")
    c.out = m / "quantized"
    return quantize(m, c.out, "--overwrite")


def out_holding_the_model(c):
    c.out = c.tmp / "models"
    shutil.copytree(c.fixture("tiny_pipeline_dir"), c.out / "tiny")
    return quantize(c.out / "tiny", c.out, "--overwrite")


def out_linked_to_the_model(c):
    m = c.copy("tiny_pipeline_dir")
    c.out = c.tmp / "link"
    os.symlink(m, c.out)
    return quantize(m, c.out, "--overwrite")


def out_is_a_bundled_model(c):
    from accuquant import bundled

    c.out = bundled.ASSETS / "mnist-ddpm"  # no --overwrite: were the check missing, "not empty" would refuse it
    return quantize("bundled:mnist-ddpm", c.out)


def grid_inside_the_model(c):
    m = c.copy("tiny_pipeline_dir")
    c.grid = m / "grid.png"
    return sample(m, c.grid)


def analysis_inside_the_base(c):
    base = c.copy("tiny_pipeline_dir")
    c.grid = base / "errors.png"  # one of the two files of the prefix
    return ["analyze", "--model", str(c.fixture("tiny_pipeline_dir")), "--base", str(base), "--out",
            str(base / "errors"), "--num", "2", "--steps", "2", "--quiet"]


def compare_out_inside_the_model(c):
    m = c.copy("tiny_pipeline_dir")
    c.out = m / "comparison"
    return ["compare", "--model", str(m), "--out", str(c.out), "--methods", "naive", "--bits", "w8a8", "--quiet"]


def export_out_is_the_model(c):
    c.out = c.copy("tiny_pipeline_dir")
    return ["export", "--model", str(c.out), "--out", str(c.out), "--overwrite"]


#: the cases of an output onto its input model, one or more per writing command
ONTO_INPUT = [out_is_the_model, out_inside_the_model, out_holding_the_model, out_linked_to_the_model,
              out_is_a_bundled_model, grid_inside_the_model, analysis_inside_the_base, compare_out_inside_the_model,
              export_out_is_the_model]


#: (id, what is wrong, what the message says); the README's table lists the same
CASES = [
    (config_missing_key, "a model `config.json` missing a key", "cannot load UNet2DModel"),
    (config_wrong_type, "a model `config.json` value of the wrong type", "cannot load UNet2DModel"),
    (truncated_json, "a truncated JSON file", "not valid JSON"),
    (non_utf8_json, "a JSON file that is not UTF-8", "not valid JSON"),
    (sampling_defaults_wrong_type, "`accuquant_sampling.json` with a value of the wrong type",
     "'guidance_scale' must be a finite number >= 0"),
    (scheduler_config_wrong_type, "a scheduler config with a value of the wrong type",
     "cannot build the ddim scheduler"),
    (symlink_loop, "a model path that is a loop of symbolic links", "a loop of symbolic links"),
    (not_a_model, "a model path that is not a diffusers model", "not a diffusers model directory"),
    (truncated_safetensors, "a truncated or corrupt weight file", "corrupt or truncated safetensors"),
    (nan_weights, "weights holding NaN or inf", "weights contain NaN or inf"),
    (calib_other_model, "`--calib` trajectories of another model", "collected from another model"),
    (calib_other_scheduler, "`--calib` trajectories of another sampler", "collected with the ddim sampler"),
    (calib_other_steps, "`--calib` trajectories of another step count", "steps do not match"),
    (calib_not_trajectories, "`--calib` with a file that is not a calibration set", "not an accuquant calibration"),
    (newer_format, "an accuquant model of a newer file format", "unknown format"),
    (newer_method_version, "an accuquant model made by a newer method version", "made by a newer accuquant"),
    (tampered_code_shape, "a tampered weight-code shape", "do not match the model"),
    (tampered_scale_count, "a tampered count of scales", "does not match the model"),
    (prompt_to_class_model, "a prompt given to a class-conditional model", "prompts given, but this model is "
     "class-conditional"),
    (labels_to_text_model, "labels given to a text-conditioned model", "labels given, but this model is "
     "text-conditioned"),
    (pipeline_missing_text_encoder, "a pipeline missing one of its text encoders (FLUX without T5)",
     "the pipeline has no text_encoder_2"),
    (labels_out_of_range, "a class label out of range", "class labels must be in 0..9"),
    (zero_num, "`--num 0`", "expected a positive integer"),
    (negative_steps, "negative `--steps`", "expected a positive integer"),
    (zero_calib_samples, "`--calib-samples 0`", "expected a positive integer"),
    (negative_batch_size, "negative `--batch-size`", "expected a positive integer"),
    (too_many_steps, "more steps than the scheduler's training steps", "2000 is out of range (1 to 1000)"),
    (negative_guidance, "a negative guidance scale", "guidance_scale: must be a finite number >= 0"),
    (non_finite_guidance, "a NaN or infinite guidance scale", "guidance_scale: must be a finite number >= 0"),
    (out_is_a_file, "an `--out` directory that is a file", "exists and is not a directory"),
    (out_not_empty, "an `--out` directory that is not empty", "not empty (pass --overwrite"),
    (out_read_only, "an `--out` where nothing can be written", "cannot write in /proc"),
    (grid_not_png, "a `sample --out` that is not a .png", "use a .png name"),
    (cuda_without_gpu, "`--device cuda` without a GPU", "no CUDA device is available"),
    (unknown_backend, "an unknown `--backend`", "unknown backend 'int9'"),
    (lora_for_another_model, "a LoRA for another architecture",
     "LoRA for another model: add_embedding.linear_1 is not a layer of this UNet2DModel"),
    (lora_rank_not_fitting, "a LoRA whose rank does not fit",
     "LoRA rank does not fit: down_blocks.1.attentions.0.to_q"),
    (gpu_backend_on_the_cpu, "a GPU-only `--backend` on the CPU", "backend cuda-int8 runs on cuda (--device cuda)"),
    (weight_bits_out_of_range, "a bit width out of range", "weight_bits: 9 bits is out of range"),
    (unknown_method, "an unknown `--method`", "unknown method 'magic'"),
    (unknown_correction, "an unknown sampling correction (`--method naive+magic`)", "unknown correction 'magic'"),
    (unknown_scheduler, "an unknown `--scheduler`", "unknown scheduler 'euler'"),
    (flag_of_another_method, "an option of another method (`--iters` for naive)", "not an option of the naive"),
    (batch_smaller_than_its_pieces, "more `--micro-batches` (times ranks) than rows in a batch",
     "a batch of 2 cannot be split into 4 pieces"),
    (unreadable_prompt_file, "a prompt file that is not UTF-8 text", "cannot read the prompt file"),
    (bad_memory_size, "a `--max-memory` that is not a size", "expected a number with a unit, e.g. 4GB"),
    (out_is_the_model, "a `quantize --out` that is the input model's directory", "the output is the input model"),
    (out_inside_the_model, "a `quantize --out` inside the input model's directory",
     "the output lies inside the input model"),
    (out_holding_the_model, "a `quantize --out` that contains the input model", "the output contains the input model"),
    (out_linked_to_the_model, "a `quantize --out` that is a symbolic link to the input model",
     "the output is the input model"),
    (out_is_a_bundled_model, "a `quantize --out` that is the bundled model quantized", "the output is the input model"),
    (grid_inside_the_model, "a `sample --out` inside the model's directory", "the output lies inside the input model"),
    (analysis_inside_the_base, "an `analyze --out` prefix inside the FP base model's directory",
     "the output lies inside the input model"),
    (compare_out_inside_the_model, "a `compare --out` inside the model's directory",
     "the output lies inside the input model"),
    (export_out_is_the_model, "an `export --out` that is the model's directory", "the output is the input model"),
    (sample_grid_of_video_model, "`sample` (an image grid) of a video model (Wan)",
     "WanTransformer3DModel (Wan 2.1) is a video model"),
    (evaluate_video_model, "`evaluate` (image metrics) of a video model", "(Wan 2.1) is a video model"),
    (analyze_video_model, "`analyze` (the FID of predicted images) of a video model", "(Wan 2.1) is a video model"),
    (compare_video_model, "`compare` (image metrics and grids) of a video model", "(Wan 2.1) is a video model"),
    (quantize_summary_of_video_model, "`quantize --summary` (image metrics) of a video model",
     "(Wan 2.1) is a video model"),
    (frames_for_image_model, "`num_frames` in `accuquant_sampling.json` of an image model",
     "is an image model; frames are for video models"),
]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("case, what, message", CASES, ids=[f.__name__ for f, _, _ in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, what, message, tmp_path, request, capsys):
    c = Ctx(tmp_path, request)
    argv = case(c)
    before = c.out.read_bytes() if c.out.is_file() else None
    kept = sorted(c.out.rglob("*")) if c.out.is_dir() else None
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("accuquant: error: "), err
    assert message in lines[0], lines[0]
    if before is not None:
        assert c.out.read_bytes() == before
    elif kept is not None:
        assert sorted(c.out.rglob("*")) == kept
    else:
        assert not c.out.exists()
    assert not c.grid.exists() or c.grid.suffix != ".png"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ONTO_INPUT, ids=[f.__name__ for f in ONTO_INPUT])
def test_an_output_onto_its_input_is_refused_before_the_model_is_read(case, tmp_path, request, capsys,
                                                                      monkeypatch):
    """Each writing command (quantize, sample, analyze, compare, export) checks its output
    against the models it reads first: nothing is loaded, quantized or written."""
    import accuquant.api
    import accuquant.io.load

    c = Ctx(tmp_path, request)
    argv = case(c)
    from accuquant import bundled

    model = Path(bundled.resolve_ref(argv[argv.index("--base" if "--base" in argv else "--model") + 1]))
    before = {p: p.stat().st_mtime_ns for p in model.rglob("*")}

    def refuse(*a, **k):
        raise AssertionError("a model was read before the output was checked")

    monkeypatch.setattr(accuquant.io.load, "load_pipeline", refuse)
    monkeypatch.setattr(accuquant.api, "quantize", refuse)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accuquant: error: ") and len(err.splitlines()) == 1, err
    assert " the input model " in err and "; write it elsewhere" in err
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*")} == before


def test_an_output_is_checked_against_its_input_model(tmp_path):
    """The output may not be the model, lie inside it or contain it: links resolved, bundled
    models by name or reference; hub ids and in-memory models are not paths to check."""
    from accuquant import bundled
    from accuquant.errors import AccuQuantError
    from accuquant.io.files import check_not_inside

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (tmp_path / "link").symlink_to(model)
    refused = [(model, model, "is"), (model / "unet" / "q", model, "lies inside"), (tmp_path, model, "contains"),
               (tmp_path / "link", model, "is"), (tmp_path / "link" / "g.png", model, "lies inside"),
               (model / "unet" / ".." / "q", model, "lies inside"), (model / "q", tmp_path / "link", "lies inside"),
               (str(model), str(model), "is"), (bundled.ASSETS / "mnist-sd", "bundled:mnist-sd", "is"),
               (bundled.ASSETS / "mnist-sd" / "g.png", "mnist-sd", "lies inside"),
               (bundled.ASSETS, "bundled:mnist-dit", "contains")]
    for out, source, where in refused:
        with pytest.raises(AccuQuantError, match=f"the output {where} the input model"):
            check_not_inside(out, source)
    for out, source in [(tmp_path / "model2", model), (tmp_path / "model-q", model), (tmp_path / "q", "org/model"),
                        (tmp_path / "q", None), (tmp_path / "q", torch.nn.Linear(1, 1)),
                        (bundled.ASSETS / "mnist-sd", "bundled:mnist-dit")]:
        check_not_inside(out, source)  # not refused


@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_nothing(tiny_pipeline_dir, tmp_path):
    """A write that fails for want of space (simulated with a file-size limit) is refused in
    one line, after which neither the output nor a temporary file is left."""
    out = tmp_path / "out"

    def limit():  # 20 kB files: the model's config fits, its weights do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "accuquant", *quantize(tiny_pipeline_dir, out, "--no-cache")],
                          capture_output=True, text=True, env=env, preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot write" in lines[0] and "too large" in lines[0], lines[0]
    assert not out.exists() and _leftovers(tmp_path) == []


def test_readme_lists_every_bad_input():
    text = README.read_text()
    for case, what, message in CASES:
        assert f"| {what} | `{message}` |" in text, f"README: no row for {case.__name__}"
