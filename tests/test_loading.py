"""Loading never runs checkpoint code, and takes dtypes by name."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch

import mmlens
import mmlens.loading

# Python a malicious checkpoint would ship: importing it writes a marker file.
EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlavaConfig as EvilConfig
from transformers import LlavaForConditionalGeneration as EvilModel
from transformers import LlavaProcessor as EvilProcessor
"""


@pytest.fixture
def evil_folder(tiny_llava_dir, tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "evil"
    shutil.copytree(tiny_llava_dir, folder)
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return folder, marker


@pytest.fixture
def answer_yes(monkeypatch):
    """A user who answers 'y' to "Do you wish to run the custom code?"."""
    monkeypatch.setattr(builtins, "input", lambda *args, **kwargs: "y")


def _add_auto_map(folder: Path, file: str, auto_map: dict) -> None:
    path = folder / file
    content = json.loads(path.read_text()) if path.is_file() else {}
    content["auto_map"] = auto_map
    path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    "file, auto_map",
    [
        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
        ("processor_config.json", {"AutoProcessor": "evil.EvilProcessor"}),
    ],
)
def test_a_folder_with_custom_code_is_refused_without_running_it(
    evil_folder, answer_yes, file, auto_map
):
    folder, marker = evil_folder
    _add_auto_map(folder, file, auto_map)
    with pytest.raises(ValueError, match=r"auto_map.*never runs checkpoint code"):
        mmlens.from_pretrained(folder)
    assert not marker.exists(), "the checkpoint's code ran"


def test_transformers_is_told_not_to_trust_remote_code(evil_folder, answer_yes, monkeypatch):
    """Even past mmlens' own check, every transformers loader gets trust_remote_code=False."""
    folder, marker = evil_folder
    config = json.loads((folder / "config.json").read_text())
    # A model type transformers does not know: only the folder's code could build it, so
    # transformers asks whether to run it (and `input` answers yes).
    config.update(model_type="evil_llava", auto_map={"AutoConfig": "evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(mmlens.loading, "refuse_custom_code", lambda folder: None)
    try:
        mmlens.from_pretrained(folder)
    except ValueError:  # transformers refuses the unknown model type without its code
        pass
    assert not marker.exists(), "the checkpoint's code ran"


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16", "bf16"])
def test_dtype_by_name(tiny_llava_dir, name):
    model = mmlens.from_pretrained(tiny_llava_dir, dtype=name)
    assert model.W_E.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, "int64", "bool"])
def test_integer_dtype_is_refused_in_one_line(tiny_llava_dir, dtype):
    with pytest.raises(ValueError, match="dtype must be a floating type") as error:
        mmlens.from_pretrained(tiny_llava_dir, dtype=dtype)
    assert "\n" not in str(error.value)


def test_unknown_dtype_name(tiny_llava_dir):
    with pytest.raises(ValueError, match="'bfloat61' is not a torch dtype"):
        mmlens.from_pretrained(tiny_llava_dir, dtype="bfloat61")


# --- which safetensors files are the weights ------------------------------------------------------


def _copy_of(folder, destination):
    shutil.copytree(folder, destination)
    return destination


def test_a_stray_second_safetensors_file_is_refused_not_read(tiny_llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from mmlens.loading import weight_files

    folder = _copy_of(tiny_llava_dir, tmp_path / "ckpt")
    (weights,) = weight_files(folder)
    tensors = load_file(weights)
    save_file(
        {name: torch.zeros_like(t) for name, t in tensors.items()}, folder / "zz-copy.safetensors"
    )
    with pytest.raises(
        ValueError,
        match=r"holds several safetensors files \(model.safetensors, zz-copy.safetensors\) and no model.safetensors.index.json.*remove the stray file",
    ):
        mmlens.from_pretrained(folder)
    # With an index, the index says which file is read: the stray copy is ignored.
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, weights.name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    reference = mmlens.from_pretrained(tiny_llava_dir)
    model = mmlens.from_pretrained(folder)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True)
    )


def test_complete_shards_without_an_index_are_read(tiny_llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from mmlens.loading import weight_files

    folder = _copy_of(tiny_llava_dir, tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    (folder / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[::2]}, folder / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, folder / "model-00002-of-00002.safetensors")
    assert [p.name for p in weight_files(folder)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ]  # fmt: skip
    (folder / "model-00002-of-00002.safetensors").rename(
        folder / "model-00002-of-00003.safetensors"
    )
    with pytest.raises(ValueError, match="holds several safetensors files"):
        weight_files(folder)


def test_safetensors_errors_name_the_file(tiny_llava_dir, tmp_path):
    folder = _copy_of(tiny_llava_dir, tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError,
        match=rf"safetensors file {folder / 'model.safetensors'} cannot be read .*damaged",
    ):
        mmlens.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "gone.safetensors"}}'
    )
    with pytest.raises(
        ValueError,
        match=r"model.safetensors.index.json names weight file\(s\) \['gone.safetensors'\]",
    ):
        mmlens.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(
        ValueError, match=r"model.safetensors.index.json is not a valid safetensors index"
    ):
        mmlens.from_pretrained(folder)
