"""The original LLaVA release format (what both papers loaded), on a random checkpoint the test
builds: the llava-hf checkpoint's weights written in the original layout (a Llama config with the
``mm_*`` settings, ``pytorch_model-*.bin`` shards, the projector under ``model.mm_projector``, a
tokenizer without ``<image>``, the CLIP tower in its own folder). Loaded by mmlens, it equals the
llava-hf checkpoint loaded by mmlens and by Hugging Face."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PreTrainedTokenizerFast,
)

import mmlens
from mmlens.models.original import _read_tensors
from mmlens.testing import hf_position_ids, make_test_image

TOLERANCE = 1e-4
PROMPTS = ["What is in the picture?", "Describe it."]


def write_original(hf_folder: Path, root: Path) -> Path:
    """The llava-hf checkpoint in `hf_folder` rewritten in the original LLaVA layout: LLaVA-1.5
    without the tower's weights (they are in the tower's folder), LLaVA-NeXT with them (the
    tower's folder then holds other, random weights, which must lose)."""
    hf_config = json.loads((hf_folder / "config.json").read_text())
    with safe_open(hf_folder / "model.safetensors", "pt") as f:
        hf = {key: f.get_tensor(key) for key in f.keys()}
    next_ = hf_config["model_type"] == "llava_next"
    placeholder = hf_config["image_token_index"]  # llava-hf appends <image> and <pad>
    n_vocab = placeholder

    tower = root / "clip-vit-tiny"
    tower.mkdir(parents=True)
    vision = {
        k.removeprefix("vision_tower."): v for k, v in hf.items() if k.startswith("vision_tower.")
    }
    if next_:
        vision = {k: torch.randn_like(v) for k, v in vision.items()}
    save_file(
        {"vision_model." + k: v.contiguous() for k, v in vision.items()},
        tower / "model.safetensors",
    )
    (tower / "config.json").write_text(
        json.dumps({**hf_config["vision_config"], "model_type": "clip_vision_model"})
    )
    hf_processor = AutoProcessor.from_pretrained(hf_folder).image_processor
    CLIPImageProcessor(
        size=hf_processor.size, crop_size=hf_processor.crop_size,
        image_mean=hf_processor.image_mean, image_std=hf_processor.image_std,
    ).save_pretrained(tower)  # fmt: skip
    if next_:  # the fine-tuned tower ships inside the checkpoint
        hf = {("model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_tower."))
              if k.startswith("vision_tower.") else k: v for k, v in hf.items()}  # fmt: skip

    folder = root / "llava-v1.5-tiny"
    folder.mkdir()
    text = dict(hf_config["text_config"])
    text.update(
        vocab_size=n_vocab, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama"
    )
    text.update(
        mm_vision_tower=str(tower), mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=hf_config["vision_feature_layer"], mm_vision_select_feature="patch",
        image_aspect_ratio="anyres" if next_ else "pad",
        mm_patch_merge_type="spatial_unpad" if next_ else "flat",
        mm_use_im_start_end=False, mm_use_im_patch_token=False,
    )  # fmt: skip
    if next_:
        text["image_grid_pinpoints"] = hf_config["image_grid_pinpoints"]
    (folder / "config.json").write_text(json.dumps(text))
    renames = {
        "model.language_model.": "model.",
        "lm_head.": "lm_head.",
        "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "model.multi_modal_projector.linear_2.": "model.mm_projector.2.",
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
        "multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "multi_modal_projector.linear_2.": "model.mm_projector.2.",
        "model.image_newline": "model.image_newline",
        "image_newline": "model.image_newline",
        "model.vision_tower.": "model.vision_tower.",
    }
    original = {}
    for key, tensor in hf.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is None:
            continue  # the vision tower lives in its own folder
        name = renames[prefix] + key[len(prefix) :]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:n_vocab]  # the original vocabulary has no <image> or <pad>
        original[name] = tensor.clone()
    torch.save(original, folder / "pytorch_model-00001-of-00001.bin")

    content = json.loads((hf_folder / "tokenizer.json").read_text())
    content["added_tokens"] = [t for t in content["added_tokens"] if t["id"] < n_vocab]
    hf_tokenizer = AutoProcessor.from_pretrained(hf_folder).tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(content)),
        bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token,
        unk_token=hf_tokenizer.unk_token,
    )  # fmt: skip
    assert len(tokenizer) == n_vocab
    tokenizer.save_pretrained(folder)
    return folder


KINDS = {
    # kind: (checkpoint factory fixture, overrides, llava-hf prepare settings that equal the original's)
    "llava-1.5": ("tiny_checkpoint", {}, dict(image_mode="pad", template="vicuna_v1")),
    "llava-v1.6-vicuna": ("tiny_next_checkpoint", {}, dict(anyres="llava", template="vicuna_v1")),
    "llama3-llava-next": (
        "tiny_next_checkpoint",
        {"family": "llama3"},
        dict(anyres="llava", template="llava_llama_3"),
    ),
}


@pytest.fixture(scope="module", params=list(KINDS))
def checkpoints(request, tmp_path_factory):
    factory, overrides, settings = KINDS[request.param]
    hf_folder = request.getfixturevalue(factory)(**overrides)
    original = write_original(hf_folder, tmp_path_factory.mktemp("original"))
    return hf_folder, original, {**settings, "tokenization": "llava"}


def test_loads_with_the_checkpoints_own_settings(checkpoints):
    hf_folder, folder, settings = checkpoints
    model = mmlens.from_pretrained(folder)
    assert type(model) is type(mmlens.from_pretrained(hf_folder))
    assert model.cfg.d_vocab == model.cfg.image_token_id == len(model.tokenizer) - 1
    assert model.prepare_defaults == settings
    inp = model.prepare(make_test_image(88, 48, 1), PROMPTS[0])
    assert all(inp.settings[key] == value for key, value in settings.items())


def test_equals_the_llava_hf_checkpoint_and_hf(checkpoints, images):
    hf_folder, folder, settings = checkpoints
    original, converted = mmlens.from_pretrained(folder), mmlens.from_pretrained(hf_folder)
    inp = original.prepare(images[:2], PROMPTS)
    reference = converted.prepare(images[:2], PROMPTS, **settings)
    assert torch.equal(inp.pixel_values, reference.pixel_values)
    real = inp.attention_mask.bool()
    assert torch.equal(inp.input_ids[real], reference.input_ids[real])
    logits, cache = original.run_with_cache(inp)
    expected, expected_cache = converted.run_with_cache(reference)
    n_vocab = original.cfg.d_vocab
    assert (logits - expected[..., :n_vocab])[real].abs().max() < TOLERANCE
    for name in ("hook_image_embeds", "blocks.1.hook_resid_post", "ln_final.hook_normalized"):
        difference = cache[name] - expected_cache[name]
        difference = difference if name == "hook_image_embeds" else difference[real]
        assert difference.abs().max() < TOLERANCE, name
    # Against Hugging Face's model (which tiles by its own rule: anyres="hf" for LLaVA-NeXT).
    hf_settings = {**settings, "anyres": "hf"} if "anyres" in settings else settings
    hf_inp = original.prepare(images[:2], PROMPTS, **hf_settings)
    hf_class = (
        LlavaNextForConditionalGeneration if "anyres" in settings else LlavaForConditionalGeneration
    )
    hf = hf_class.from_pretrained(hf_folder).eval()
    hf_kwargs = converted.prepare(images[:2], PROMPTS, **hf_settings).model_kwargs()
    with torch.no_grad():
        out = hf(**hf_kwargs, position_ids=hf_position_ids(hf_inp.attention_mask))
    real = hf_inp.attention_mask.bool()
    assert (out.logits[..., :n_vocab] - original(hf_inp))[real].abs().max() < TOLERANCE
    assert torch.equal(
        original.generate(inp.item(0), max_new_tokens=5)[0, -5:],
        converted.generate(reference.item(0), max_new_tokens=5)[0, -5:],
    )


def test_bin_shards_are_read_as_tensors_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    shard = tmp_path / "pytorch_model-00001-of-00001.bin"
    with open(shard, "wb") as stream:
        pickle.dump({"model.norm.weight": Payload()}, stream, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        _read_tensors(tmp_path)


def test_unsupported_settings_are_named(checkpoints, tmp_path):
    _, folder, _ = checkpoints
    config = json.loads((folder / "config.json").read_text())
    for key, value, message in [
        ("mm_projector_type", "mlp3x_gelu", "mm_projector_type 'mlp3x_gelu' is not supported"),
        ("mm_patch_merge_type", "unpad", "mm_patch_merge_type 'unpad' is not supported"),
    ]:
        broken = tmp_path / key
        broken.mkdir()
        for path in folder.iterdir():
            (broken / path.name).write_bytes(path.read_bytes())
        (broken / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(NotImplementedError, match=message):
            mmlens.from_pretrained(broken)


def test_every_experiment_and_the_demo_report_run_on_an_original_release(checkpoints, tmp_path):
    import warnings

    from mmlens.experiments import EXPERIMENTS
    from mmlens.report import write_report
    from mmlens.testing.sae import build_random_sae
    from mmlens.zoo.shapes import generate

    small = {  # a few forward passes each on these 2-layer decoders
        "knockout": dict(window_size=1),
        "module-jaccard": dict(window=1),
        "cam": dict(layers=[0], noise_std=0.0, n_samples=1),
        "truncation": dict(layers=[0], keep=0),
        "fastv": dict(k=1),
    }
    model = mmlens.from_pretrained(checkpoints[1])
    small["sae-features"] = dict(sae=str(build_random_sae(tmp_path / "sae", model)))
    for experiment in sorted(EXPERIMENTS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed sample is a warning
            result = mmlens.run(
                experiment, model, "shapes:2", tmp_path / experiment, correct_only=False,
                progress=False, **small.get(experiment, {}),
            )  # fmt: skip
        assert result["sample_id"].nunique() == 2, experiment
    html = write_report(model, generate(3, seed=1), tmp_path / "r.html", progress=False)
    assert "LLaVA-CAM" in html.read_text()


def test_the_runner_and_the_analyses_run_on_an_original_release(checkpoints, tmp_path):
    _, folder, settings = checkpoints
    result = mmlens.run(
        "knockout", folder, "shapes:7", tmp_path / "run", window_size=1, progress=False
    )
    assert len(result) > 0 and result.attrs["model"] == str(folder)
    model = mmlens.from_pretrained(folder)
    inp = model.prepare(make_test_image(64, 48, 2), PROMPTS[0])
    cam = mmlens.analysis.llava_cam(model, inp, "red", layers=[0], noise_std=0, progress=False)
    assert cam.maps.shape[0] == 1 and (cam.highres_maps is not None) == ("anyres" in settings)
