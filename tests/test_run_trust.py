"""A runner you can trust at data-set scale (docs/experiments.md, "What a run guarantees"), each
promise shown by injecting its fault: resume refuses changed weights, dtype, data and unlabelled
parts; one bad sample never stops a run; failed samples are retried; one writer per rank; damaged
batches are named and computed again; two CPU processes under torchrun shard the run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mmlens
from mmlens import results
from mmlens.data import Dataset, load
from mmlens.experiments import EXPERIMENTS, DamagedRun, RunLocked, RunMismatch
from mmlens.experiments.integrity import RunLock
from mmlens.experiments.store import RunStore
from mmlens.zoo import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return mmlens.load("tiny-shapes")


@pytest.fixture(scope="module")
def shapes() -> Dataset:
    return load("shapes:8")


def run(model, data, out, experiment="knockout", **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("centres", [1])
    kwargs.setdefault("window_size", 3)
    return mmlens.run(experiment, model, data, out, **kwargs)


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["sample_index"]).reset_index(drop=True)


def on_disk(shapes: Dataset, folder: Path, n: int = 3) -> Dataset:
    """The first `n` samples with their images as PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for sample in shapes[:n]:
        path = folder / f"{sample.sample_id}.png"
        sample.image.save(path)
        samples.append(dataclasses.replace(sample, image=path))
    return Dataset(samples, "shapes", source="images on disk")


# --- 1. resume refuses a changed run --------------------------------------------------------


def test_weights_changed_in_place_with_the_same_shapes_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint_path("tiny-shapes"), folder)
    data = "shapes:2"
    mmlens.run(
        "knockout", str(folder), data, tmp_path / "out", centres=[1], window_size=3, progress=False
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["identity"]["model"]["weight_files"] == ["model.safetensors"]
    tensors = load_file(folder / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3  # same shape, same size on disk, other content
    size = (folder / "model.safetensors").stat().st_size
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert (folder / "model.safetensors").stat().st_size == size
    with pytest.raises(
        RunMismatch, match=r"model: fingerprint: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now"
    ):
        mmlens.run(
            "knockout",
            str(folder),
            data,
            tmp_path / "out",
            centres=[1],
            window_size=3,
            progress=False,
        )


def test_another_dtype_is_refused(tmp_path):
    mmlens.run("cliff", "tiny-shapes", "shapes:2", tmp_path, progress=False)
    with pytest.raises(RunMismatch, match=r"dtype: 'torch.float32' there, 'torch.bfloat16' now"):
        mmlens.run("cliff", "tiny-shapes", "shapes:2", tmp_path, dtype="bfloat16", progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["identity"]["model"]["device"] == ["cpu"]


def test_an_edited_question_under_the_same_id_is_refused(model, shapes, tmp_path):
    run(model, shapes[:3], tmp_path)
    edited = dataclasses.replace(shapes[1], question=shapes[1].question + " Really?")
    data = Dataset([shapes[0], edited, shapes[2]], "shapes", source=shapes.source)
    with pytest.raises(
        RunMismatch, match=rf"sample\(s\) '{shapes[1].sample_id}' computed from other content"
    ):
        run(model, data, tmp_path)


def test_images_pointing_at_other_pictures_are_refused(model, shapes, tmp_path):
    data = on_disk(shapes, tmp_path / "images")
    run(model, data, tmp_path / "out")
    other = on_disk(shapes, tmp_path / "other")
    shapes[3].image.save(other[2].image)  # same file name, another picture
    with pytest.raises(RunMismatch, match=rf"'{shapes[2].sample_id}' computed from other content"):
        run(model, other, tmp_path / "out")
    same = on_disk(shapes, tmp_path / "copy")  # the same pictures elsewhere resume
    assert run(model, same, tmp_path / "out").sample_id.nunique() == 3


def test_parts_without_a_manifest_are_refused_unless_relabelled(model, shapes, tmp_path):
    reference = run(model, shapes[:4], tmp_path / "reference", batch_size=2)
    run(model, shapes[:2], tmp_path / "out", batch_size=2)
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(
        RunMismatch,
        match=r"1 committed batch\(es\) \(000-000000.json, ...\) but no manifest.json.*--relabel",
    ):
        run(model, shapes[:4], tmp_path / "out", batch_size=2)
    relabelled = run(model, shapes[:4], tmp_path / "out", batch_size=2, relabel=True)
    pd.testing.assert_frame_equal(comparable(relabelled), comparable(reference))
    # --relabel labels unlabelled batches only: a readable manifest of other settings stays
    with pytest.raises(RunMismatch, match=r"options: centres: \[1\] there, \[2\] now"):
        run(model, shapes[:4], tmp_path / "out", batch_size=2, relabel=True, centres=[2])


# --- 2. one bad sample never stops a run ------------------------------------------------------


def test_a_decompression_bomb_fails_that_sample_only(model, shapes, tmp_path, monkeypatch):
    data = on_disk(shapes, tmp_path / "images")
    Image.new("RGB", (400, 400)).save(data[1].image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 112 * 112)  # 400 x 400 > 2 x 112 x 112
    with pytest.warns(UserWarning, match="1 sample\\(s\\) failed"):
        result = run(model, data, tmp_path / "out", batch_size=3)
    assert sorted(result.sample_id.unique()) == sorted([data[0].sample_id, data[2].sample_id])
    assert result.attrs["failed"][data[1].sample_id].startswith("image: DecompressionBombError")


def test_the_correct_answer_filter_fails_one_sample_not_the_run(model, shapes, tmp_path):
    no_answer = dataclasses.replace(shapes[1], answer=None)
    data = Dataset([shapes[0], no_answer, shapes[2]], "shapes")
    with pytest.warns(UserWarning, match="1 sample\\(s\\) failed"):
        result = run(model, data, tmp_path, batch_size=3, correct_only=True)
    reason = result.attrs["failed"][no_answer.sample_id]
    assert (
        reason.startswith("correct-answer filter: ValueError: sample") and "has no answer" in reason
    )
    assert set(result.sample_id) | set(result.attrs["dropped"]) == {
        shapes[0].sample_id,
        shapes[2].sample_id,
    }


def test_a_scoring_error_fails_that_sample_only(model, shapes, tmp_path, monkeypatch):
    from mmlens import metrics

    original = metrics.score_sample

    def score(dataset, sample, prediction):
        if sample.sample_id == shapes[1].sample_id:
            raise KeyError("no metric field")
        return original(dataset, sample, prediction)

    monkeypatch.setattr(metrics, "score_sample", score)
    with pytest.warns(UserWarning, match="1 sample\\(s\\) failed"):
        result = mmlens.run("truncation", model, shapes[:3], tmp_path, layers=[1], batch_size=3,
                            progress=False)  # fmt: skip
    assert set(result.sample_id) == {shapes[0].sample_id, shapes[2].sample_id}
    assert result.attrs["failed"] == {shapes[1].sample_id: "KeyError: 'no metric field'"}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(flows=["Image→Nowhere"]), r"unknown flow\(s\) \['Image→Nowhere'\]; flows: "),
        (dict(window_size=7), r"window_size=7 is wider than the model's 6 decoder layers"),
        (dict(centres=[6], window_size=3), r"centres=6 is outside 0..5"),
    ],
)
def test_option_errors_are_raised_once_before_the_run(model, shapes, tmp_path, options, message):
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        original = EXPERIMENTS["knockout"]
        patch.setitem(
            EXPERIMENTS, "knockout",
            dataclasses.replace(original, run=lambda c, s: calls.append(s) or original.run(c, s)),
        )  # fmt: skip
        with pytest.raises(ValueError, match=message):
            mmlens.run("knockout", model, shapes[:2], tmp_path / "out", progress=False, **options)
    assert calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "experiment, options, message",
    [
        ("knockout", dict(window_size=7), r"window_size=7 is wider than the model's 6"),
        ("knockout", dict(), r"window_size=9 \(the default\) is wider than the model's 6"),
        ("truncation", dict(layers=[8]), r"layers=8 is outside 0..5"),
        ("fastv", dict(k=6), r"k=6 is outside 1..5"),
    ],
)
def test_layer_options_are_refused_before_the_weights_load(
    shapes, tmp_path, monkeypatch, experiment, options, message
):
    """A model given by name: its layers come from its config, so no weight is read for a run
    whose options it cannot take."""
    import mmlens.models.decoder

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the options were checked")

    monkeypatch.setattr(mmlens.models.decoder, "load_weights", no_weights)
    with pytest.raises(ValueError, match=message):
        mmlens.run(experiment, "tiny-shapes", shapes[:2], tmp_path / "out", progress=False,
                   **options)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_skip_bad_covers_undecodable_lines_and_over_deep_json(shapes, tmp_path):
    from mmlens.data import DataError, load_jsonl

    shapes[0].image.save(tmp_path / "a.png")
    good = json.dumps({"sample_id": "a", "question": "Q?", "image": "a.png", "answer": "red"})
    deep = "[" * 100_000 + "]" * 100_000
    lines = [good.encode(), b'{"sample_id": "b", "question": "caf\xe9?"}', deep.encode()]
    (tmp_path / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"data.jsonl, row 2: not UTF-8 text: 'utf-8' codec"):
        load_jsonl(tmp_path / "data.jsonl")
    data = load_jsonl(tmp_path / "data.jsonl", skip_bad=True)
    assert data.ids == ["a"]
    assert [message.split(": ", 1)[1].split(":")[0] for message in data.skipped] == [
        "not UTF-8 text",
        "not readable JSON",
    ]
    assert "data.jsonl, row 3: not readable JSON: nested too deeply" in data.skipped[1]


def test_skip_bad_covers_undecodable_scienceqa_images(tmp_path):
    import io

    import pyarrow.parquet as pq
    from published_formats import scienceqa_table

    from mmlens.data import DataError, load_scienceqa

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    damaged = png.getvalue()[:-20] + b"\0" * 20  # a valid header, a broken last chunk
    rows = [
        {"image": {"bytes": png.getvalue(), "path": None}, "question": "Q?", "choices": ["a", "b"], "answer": 0, "hint": ""},
        {"image": {"bytes": damaged, "path": None}, "question": "Q?", "choices": ["a", "b"], "answer": 1, "hint": ""},
    ]  # fmt: skip
    pq.write_table(scienceqa_table(rows), tmp_path / "test.parquet")
    with pytest.raises(
        DataError, match=r"test.parquet, row 2, field 'image': not a decodable image"
    ):
        load_scienceqa(tmp_path / "test.parquet")
    data = load_scienceqa(tmp_path / "test.parquet", skip_bad=True)
    assert data.ids == ["test-0"] and len(data.skipped) == 1


# --- 3. failures are retried, and complete means complete -------------------------------------


def test_failed_samples_are_retried_and_complete_means_complete(
    model, shapes, tmp_path, monkeypatch
):
    reference = run(model, shapes[:4], tmp_path / "reference", batch_size=2)
    original = EXPERIMENTS["knockout"]
    flaky = shapes[2].sample_id
    calls: list[str] = []
    broken = [True]

    def failing_once(context, samples):
        calls.extend(sample.sample_id for sample in samples)
        if broken[0] and any(sample.sample_id == flaky for sample in samples):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original.run(context, samples)

    monkeypatch.setitem(EXPERIMENTS, "knockout", dataclasses.replace(original, run=failing_once))
    with pytest.warns(UserWarning, match=rf"1 sample\(s\) failed.*{flaky}: OutOfMemoryError"):
        first = run(model, shapes[:4], tmp_path / "out", batch_size=2)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["finished"] == 3
    assert manifest["failed_attempts"] == {flaky: 1} and flaky not in set(first.sample_id)
    calls.clear()
    with pytest.warns(UserWarning, match="1 sample\\(s\\) failed"):  # --no-retry-failed
        run(model, shapes[:4], tmp_path / "out", batch_size=2, retry_failed=False)
    assert calls == []
    broken[0] = False  # the transient error is gone
    retried = run(model, shapes[:4], tmp_path / "out", batch_size=2)
    assert calls == [flaky]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["finished"] == 4 and manifest["failed"] == {}
    pd.testing.assert_frame_equal(
        comparable(retried.sort_values("sample_index", kind="stable")), comparable(reference)
    )


# --- 4. one writer per run directory, damage named and repaired --------------------------------


def test_a_second_writer_of_a_rank_is_refused_naming_the_holder(model, shapes, tmp_path):
    run(model, shapes[:2], tmp_path)
    with RunLock(
        tmp_path, rank=0
    ):  # another writer of rank 0 (a second open file: flock conflicts)
        with pytest.raises(
            RunLocked,
            match=rf"another process \(pid {os.getpid()} on host {socket.gethostname()}; lock file .*lock-000, rank 0\)",
        ):
            run(model, shapes[:2], tmp_path)
        # the ranks of one data-parallel run (or a SLURM array's shards) are not blocked
        assert len(run(model, shapes[:4], tmp_path / "sharded", shard=(1, 2))) > 0
    assert len(run(model, shapes[:2], tmp_path)) > 0  # released when the holder lets go


def test_the_lock_is_released_on_an_interrupt(model, shapes, tmp_path, monkeypatch):
    original = EXPERIMENTS["knockout"]

    def interrupted(context, samples):
        raise KeyboardInterrupt

    monkeypatch.setitem(EXPERIMENTS, "knockout", dataclasses.replace(original, run=interrupted))
    with pytest.raises(KeyboardInterrupt):
        run(model, shapes[:2], tmp_path)
    with RunLock(tmp_path, rank=0):  # free again
        pass


def test_damaged_batches_are_named_and_computed_again(model, shapes, tmp_path, monkeypatch):
    reference = run(model, shapes[:5], tmp_path / "reference", batch_size=1)
    out = tmp_path / "out"
    run(model, shapes[:5], out, batch_size=1)
    parts = out / "parts"
    truncated = (parts / "000-000000.parquet").read_bytes()
    (parts / "000-000000.parquet").write_bytes(truncated[: len(truncated) // 2])
    shutil.copy(parts / "000-000002.parquet", parts / "000-000001.parquet")  # another batch's part
    (parts / "000-000002.json").write_text("")  # an empty record
    (parts / "000-000003.json").write_text('{"sample_ids": ["x"]}')  # a record missing fields
    with pytest.raises(DamagedRun, match=r"4 committed batch\(es\) of .* are damaged") as error:
        results.load(out)
    message = str(error.value)
    assert "000-000000.json: part 000-000000.parquet is truncated" in message
    assert (
        "000-000001.json: part 000-000001.parquet does not match the record's content hash"
        in message
    )
    assert "000-000002.json: the record is damaged (JSONDecodeError" in message
    assert "000-000003.json: the record is damaged (field 'n_rows' missing" in message
    assert message.endswith(
        "Run the same command again: it moves them aside and computes them again"
    )
    calls: list[str] = []
    original = EXPERIMENTS["knockout"]
    monkeypatch.setitem(
        EXPERIMENTS, "knockout",
        dataclasses.replace(original, run=lambda c, s: calls.extend(x.sample_id for x in s) or original.run(c, s)),
    )  # fmt: skip
    with pytest.warns(
        UserWarning, match="moved to .*damaged and its samples are computed again"
    ) as warned:
        repaired = run(model, shapes[:5], out, batch_size=1)
    assert sorted(str(w.message).split(": ")[0].rsplit("/", 1)[1] for w in warned) == [
        f"000-00000{i}.json" for i in range(4)
    ]
    assert calls == shapes.ids[:4]  # the four damaged batches, not the intact fifth
    pd.testing.assert_frame_equal(comparable(repaired), comparable(reference))
    assert len(list((parts / "damaged").glob("*.json"))) == 4


def test_a_damaged_manifest_is_named_and_refused_unless_relabelled(model, shapes, tmp_path):
    reference = run(model, shapes[:2], tmp_path / "reference")
    run(model, shapes[:2], tmp_path / "out")
    (tmp_path / "out" / "manifest.json").write_text('{"identity": {"experiment": "kno')
    with pytest.raises(DamagedRun, match=r"manifest.json is damaged \(JSONDecodeError"):
        results.load(tmp_path / "out")
    with pytest.raises(RunMismatch, match=r"manifest.json is damaged .*--relabel"):
        run(model, shapes[:2], tmp_path / "out")
    relabelled = run(model, shapes[:2], tmp_path / "out", relabel=True)
    pd.testing.assert_frame_equal(comparable(relabelled), comparable(reference))


# --- 5. data-parallel on CPUs ---------------------------------------------------------------------


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", "{port}"],
    # accelerate's --cpu runs one process (without an MPI set-up); --multi_gpu on a machine
    # without GPUs launches two CPU processes through torchrun.
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "{port}"],
}  # fmt: skip


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes_give_the_single_process_frame(model, tmp_path, launcher):
    single = run(model, load("shapes:6"), tmp_path / "single", centres=[1, 4], batch_size=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, *(part.format(port=port) for part in LAUNCHERS[launcher]),
        "-m", "mmlens", "run", "knockout", "--model", "tiny-shapes", "--data", "shapes:6",
        "--out", str(tmp_path / "two"), "--batch-size", "1", "--centres", "1,4",
        "--window-size", "3",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                   "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    two = results.load(tmp_path / "two")
    pd.testing.assert_frame_equal(comparable(two), comparable(single))
    ranks = {path.name[:3] for path in (tmp_path / "two" / "parts").glob("*.json")}
    assert ranks == {"000", "001"}
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["complete"]


def test_parts_and_records_are_fsynced_before_they_are_renamed(tmp_path, monkeypatch):
    from mmlens.experiments import store as store_module
    from mmlens.experiments.store import Batch

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, destination):
        events.append(("rename", str(source)))
        return real_replace(source, destination)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "replace", replace)
    store = RunStore(tmp_path)
    store.open({"experiment": "x"})
    events.clear()
    tensors = {"q1": torch.ones(2)}
    store.commit(Batch(["q1"], rows=[{"sample_id": "q1", "v": 1.0}], tensors=tensors))
    store.close()
    renamed = [path for kind, path in events if kind == "rename"]
    assert [Path(path).name.split(".")[1] for path in renamed] == [
        "000-000000", "000-000000", "000-000000",
    ]  # fmt: skip
    assert [Path(p).name for p in renamed] == [
        f".000-000000.{suffix}.{os.getpid()}.tmp" for suffix in ("parquet", "safetensors", "json")
    ]
    for path in renamed:  # each file is fsynced before its rename, the record last
        assert events.index(("fsync", path)) < events.index(("rename", path))


def test_the_cli_takes_relabel_and_no_retry_failed(tmp_path, capsys):
    from mmlens.__main__ import main

    command = ["run", "cliff", "--model", "tiny-shapes", "--data", "shapes:2", "--out",
               str(tmp_path), "--device", "cpu"]  # fmt: skip
    main(command)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(SystemExit) as exit_info:  # RunMismatch, told in one line
        main(command + ["--no-retry-failed"])
    assert exit_info.value.code == 1 and "--relabel" in capsys.readouterr().err
    main(command + ["--relabel", "--no-retry-failed"])
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"]
    assert "'experiment': 'cliff'" in capsys.readouterr().out


def test_a_sample_whose_image_was_missing_runs_once_it_is_there(model, shapes, tmp_path):
    data = on_disk(shapes, tmp_path / "images")
    data[1].image.rename(tmp_path / "aside.png")
    with pytest.warns(UserWarning, match=rf"1 sample\(s\) failed.*{data[1].sample_id}: image: "):
        run(model, data, tmp_path / "out")
    (tmp_path / "aside.png").rename(data[1].image)
    result = run(model, data, tmp_path / "out")  # its hash changed, but it has no rows to mix
    assert set(result.sample_id) == set(data.ids) and result.attrs["failed"] == {}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_a_lazily_opened_image_that_does_not_decode_fails_that_sample_only(model, shapes, tmp_path):
    """ScienceQA's images are opened from bytes and decoded on first use: neither the sample
    hash nor the run stops on one whose pixels are broken."""
    import io

    png = io.BytesIO()
    shapes[1].image.save(png, format="PNG")
    broken = Image.open(io.BytesIO(png.getvalue()[:200]))  # a header, then too few bytes
    data = Dataset([shapes[0], dataclasses.replace(shapes[1], image=broken), shapes[2]], "shapes")
    with pytest.warns(UserWarning, match=rf"1 sample\(s\) failed.*{shapes[1].sample_id}: "):
        result = run(model, data, tmp_path, batch_size=3)
    assert set(result.sample_id) == {shapes[0].sample_id, shapes[2].sample_id}
    assert "OSError" in result.attrs["failed"][shapes[1].sample_id]
