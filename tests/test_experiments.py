"""The experiment runner: its rows equal the analyses it wraps, it resumes after Ctrl-C and
SIGKILL without losing or duplicating samples, refuses other settings, shards deterministically
(two gloo processes give a single process' rows), and the CLI runs it."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import mmlens
from mmlens import results
from mmlens.analysis import (
    attention_share,
    correct_answers,
    correct_without_image,
    knockout_sweep,
    llava_cam,
    logit_lens,
)
from mmlens.analysis.lens import answer_token_variants
from mmlens.data import Dataset, Sample, load
from mmlens.experiments import EXPERIMENTS, RunMismatch
from mmlens.experiments.store import RunStore
from mmlens.presets import CROSS_MODAL_FLOW

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return mmlens.load("tiny-shapes")


@pytest.fixture(scope="module")
def shapes() -> Dataset:
    return load("shapes:8")  # the CLI's "shapes:8" (seed 0)


def run(model, data, out, experiment="knockout", **kwargs):
    kwargs.setdefault("progress", False)
    if experiment == "knockout":  # the organism's 6 layers take no 9-layer window
        kwargs.setdefault("window_size", 3)
    return mmlens.run(experiment, model, data, out, **kwargs)


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["sample_index"]).reset_index(drop=True)


# --- rows equal the analyses ------------------------------------------------------------------


def test_knockout_rows_equal_knockout_sweep_and_wrong_answers_are_dropped(model, shapes, tmp_path):
    wrong = dataclasses.replace(shapes[1], answer="purple-ish")  # never the model's answer
    data = Dataset([shapes[0], wrong, *shapes[2:5]], "shapes")
    result = run(
        model,
        data,
        tmp_path,
        preset="cross_modal_flow",
        centres=[1, 3],
        batch_size=2,
        window_size=3,
    )
    # The organism was trained without the preset's suffix, so it misses some of these: the
    # run keeps exactly those that correct_answers accepts under the preset.
    candidates = [shapes[0], wrong, *shapes[2:5]]
    prepared = [model.prepare(s.image, s.question, preset=CROSS_MODAL_FLOW) for s in candidates]
    is_correct = [
        bool(correct_answers(model, inp, s.answer))
        for inp, s in zip(prepared, candidates, strict=True)
    ]
    kept = [s for s, ok in zip(candidates, is_correct, strict=True) if ok]
    inputs = [inp for inp, ok in zip(prepared, is_correct, strict=True) if ok]
    assert 0 < len(kept) < len(candidates) and not is_correct[1]
    expected = knockout_sweep(
        model,
        inputs,
        preset=CROSS_MODAL_FLOW,
        boxes=[s.boxes for s in kept],
        window_size=3,
        centres=[1, 3],
        progress=False,
    )
    assert list(result.sample_id.unique()) == [s.sample_id for s in kept]
    pd.testing.assert_series_equal(
        result.relative_change, expected.relative_change, check_exact=False, atol=1e-4, rtol=0
    )
    assert (result.flow.values == expected.flow.values).all()
    dropped = {s.sample_id for s, ok in zip(candidates, is_correct, strict=True) if not ok}
    # Each dropped sample's reason names the model's greedy first token and the gold answer.
    said = {
        s.sample_id: model.to_string(model(inp)[0, -1].argmax())
        for s, inp in zip(candidates, prepared, strict=True)
    }
    assert result.attrs["dropped"] == {
        key: f"answered incorrectly: {said[key].strip()!r} for {data[data.ids.index(key)].answer!r}"
        for key in dropped
    }
    assert "for 'purple-ish'" in result.attrs["dropped"][wrong.sample_id]
    assert result.attrs["window_size"] == 3 and result.attrs["preset"] == "cross_modal_flow"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["finished"] == 5
    assert manifest["identity"]["options"]["centres"] == [1, 3]
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["transformer_lens"] == importlib.metadata.version(
        "transformer-lens"
    )
    assert manifest["processor"]["image_processor"]["image_mean"]


def test_analysis_experiments_equal_their_functions(model, shapes, tmp_path):
    sample = shapes[0]
    inp = model.prepare(sample.image, sample.question)
    lens = run(model, shapes[:1], tmp_path / "lens", "logit-lens")
    expected = logit_lens(model, inp, answer_token_variants(model, inp, sample.answer))
    assert lens.probability.tolist() == pytest.approx(expected.probability.tolist(), abs=1e-6)
    share = run(model, shapes[:1], tmp_path / "share", "attention-share")
    assert share.share.tolist() == pytest.approx(
        attention_share(model, inp).share.tolist(), abs=1e-6
    )
    cliff = run(model, shapes[:2], tmp_path / "cliff", "cliff", batch_size=2)
    both = model.prepare([s.image for s in shapes[:2]], [s.question for s in shapes[:2]])
    expected_cliff = correct_without_image(model, both, [s.answer for s in shapes[:2]])
    assert cliff.correct.tolist() == expected_cliff.T.flatten().tolist()
    assert results.summary(cliff).accuracy.tolist() == expected_cliff.float().mean(1).tolist()


def test_cam_maps_are_saved_as_tensors(model, shapes, tmp_path):
    sample = shapes[2]
    result = run(model, shapes[2:3], tmp_path, "cam", layers=[0, 2], noise_std=0.0)
    maps = results.load_tensors(tmp_path)[sample.sample_id]
    expected = llava_cam(
        model, model.prepare(sample.image, sample.question), sample.answer, layers=[0, 2],
        noise_std=0.0, progress=False,
    )  # fmt: skip
    torch.testing.assert_close(maps, expected.maps)
    assert result.layer.tolist() == ["blocks.0", "blocks.2"]
    assert result.mass_in_box.between(0, 1).all()


def test_truncation_scores_generated_answers_with_the_data_sets_metric(model, shapes, tmp_path):
    result = run(model, shapes[:4], tmp_path, "truncation", layers=[0], keep=0, batch_size=2)
    assert list(result.condition.unique()) == ["baseline", "layer 0"]
    baseline = result[result.condition == "baseline"]
    for sample, generated in zip(shapes[:4], baseline.generated, strict=True):
        inp = model.prepare(sample.image, sample.question)
        tokens = model.generate(inp, max_new_tokens=shapes.max_new_tokens)
        alone = model.tokenizer.decode(
            tokens[0, inp.input_ids.shape[1] :], skip_special_tokens=True
        ).strip()
        assert generated == alone
    table = results.summary(result).set_index("condition")
    assert table.loc["baseline", "accuracy"] == baseline.correct.mean()
    assert table.loc["baseline", "n"] == 4


# --- resumption ----------------------------------------------------------------------------


def test_ctrl_c_then_resume_loses_and_repeats_nothing(model, shapes, tmp_path, monkeypatch):
    reference = run(model, shapes, tmp_path / "reference", centres=[2], batch_size=2)
    calls: list[str] = []
    original = EXPERIMENTS["knockout"]

    def counting(context, samples):
        calls.extend(sample.sample_id for sample in samples)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return original.run(context, samples)

    monkeypatch.setitem(EXPERIMENTS, "knockout", dataclasses.replace(original, run=counting))
    with pytest.raises(KeyboardInterrupt):
        run(model, shapes, tmp_path / "resumed", centres=[2], batch_size=2)
    assert RunStore(tmp_path / "resumed").finished() == set(shapes.ids[:4])
    calls.clear()
    monkeypatch.setitem(
        EXPERIMENTS,
        "knockout",
        dataclasses.replace(
            original, run=lambda c, s: calls.extend(x.sample_id for x in s) or original.run(c, s)
        ),
    )
    resumed = run(model, shapes, tmp_path / "resumed", centres=[2], batch_size=2)
    assert calls == shapes.ids[4:]  # only the unfinished samples ran
    pd.testing.assert_frame_equal(comparable(resumed), comparable(reference))


def test_sigkill_then_resume_gives_the_uninterrupted_rows(tmp_path):
    command = [
        sys.executable, "-m", "mmlens", "run", "knockout", "--model", "tiny-shapes",
        "--data", "shapes:48", "--out", str(tmp_path / "killed"), "--batch-size", "2",
        "--window-size", "3", "--device", "cpu",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.json"))) < 2:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    n_committed = len(RunStore(tmp_path / "killed").finished())
    assert 0 < n_committed < 48, "the run must be killed mid-way"
    subprocess.run(command, env=environment, check=True, capture_output=True)
    reference = command[:]
    reference[reference.index("--out") + 1] = str(tmp_path / "reference")
    subprocess.run(reference, env=environment, check=True, capture_output=True)
    resumed, uninterrupted = results.load(tmp_path / "killed"), results.load(tmp_path / "reference")
    assert resumed.sample_id.nunique() == 48
    pd.testing.assert_frame_equal(comparable(resumed), comparable(uninterrupted))


def test_other_settings_are_refused(model, shapes, tmp_path):
    run(model, shapes[:2], tmp_path, centres=[1])
    with pytest.raises(RunMismatch, match=r"options: centres: \[1\] there, \[2\] now"):
        run(model, shapes[:2], tmp_path, centres=[2])
    with pytest.raises(RunMismatch, match="experiment"):
        run(model, shapes[:2], tmp_path, "logit-lens")


# --- failures, sharding, processes -------------------------------------------------------------


def test_a_missing_image_fails_that_sample_only(model, shapes, tmp_path):
    missing = Sample("missing", "What colour is the circle?", tmp_path / "nope.png", answer="red")
    data = Dataset([shapes[0], missing, shapes[1]], "shapes")
    with pytest.warns(UserWarning, match="1 sample\\(s\\) failed.*missing: image"):
        result = run(model, data, tmp_path / "out", centres=[1], batch_size=3)
    assert list(result.sample_id.unique()) == [shapes[0].sample_id, shapes[1].sample_id]
    assert "nope.png" in result.attrs["failed"]["missing"]


def test_shards_partition_the_run(model, shapes, tmp_path):
    whole = run(model, shapes, tmp_path / "whole", centres=[1], batch_size=1)
    for index in range(3):
        part = run(model, shapes, tmp_path / "sharded", centres=[1], batch_size=1, shard=(index, 3))
    pd.testing.assert_frame_equal(comparable(part), comparable(whole))
    ranks = {path.name[:3] for path in (tmp_path / "sharded" / "parts").glob("*.json")}
    assert ranks == {"000", "001", "002"}


def test_two_gloo_processes_give_the_single_process_rows(model, shapes, tmp_path):
    single = run(model, shapes, tmp_path / "single", centres=[1, 4], batch_size=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "mmlens", "run", "knockout", "--model", "tiny-shapes",
        "--data", "shapes:8", "--out", str(tmp_path / "two"), "--batch-size", "1",
        "--centres", "1,4", "--window-size", "3", "--device", "cpu",
    ]  # fmt: skip
    processes = [
        subprocess.Popen(
            command,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    for process in processes:
        _, error = process.communicate(timeout=300)
        assert process.returncode == 0, error[-2000:]
    two = results.load(tmp_path / "two")
    pd.testing.assert_frame_equal(comparable(two), comparable(single))
    ranks = {path.name[:3] for path in (tmp_path / "two" / "parts").glob("*.json")}
    assert ranks == {"000", "001"}


# --- the command line ---------------------------------------------------------------------------


def test_cli_runs_and_checks_its_options(tmp_path, capsys):
    from mmlens.__main__ import main

    out = tmp_path / "cli"
    main(["run", "knockout", "--model", "tiny-shapes", "--data", "shapes:2", "--out", str(out),
          "--centres", "1", "--window-size", "3", "--device", "cpu"])  # fmt: skip
    assert "'experiment': 'knockout'" in capsys.readouterr().out
    assert results.load(out).attrs["window_size"] == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "knockout", "--model", "tiny-shapes", "--data", "shapes:2", "--out",
              str(out), "--keep", "3"])  # fmt: skip
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "mmlens run: error: --keep does not apply to experiment 'knockout'\n"
    )


def test_the_fixture_samples_are_all_answered_correctly(model, shapes):
    """A precondition of the equality tests above: without a preset no sample is dropped."""
    inp = model.prepare([s.image for s in shapes], [s.question for s in shapes])
    assert correct_answers(model, inp, [s.answer for s in shapes]).all()


def test_plots_take_run_results_and_facet_by_question_type(model, tmp_path):
    from mmlens import plot
    from mmlens.analysis import cliff_of

    data = load("shapes:14")  # every question type twice
    knockout = run(model, data, tmp_path / "k", window_size=3, centres=[0, 2], batch_size=7)
    figure = plot.knockout_sweep(knockout, facet="question_type")
    titles = {annotation.text for annotation in figure.layout.annotations}
    assert titles == set(knockout.question_type)
    lines = [trace for trace in figure.data if trace.mode == "lines+markers"]
    assert len(lines) == len(titles) * knockout.flow.nunique()
    means = knockout.groupby(["question_type", "flow", "layer"]).relative_change.mean()
    first = lines[0]
    assert list(first.y) == pytest.approx(means[sorted(titles)[0], first.name].tolist())
    lens = run(model, data[:4], tmp_path / "l", "logit-lens")
    assert {trace.name for trace in plot.logit_lens(lens).data} == set(lens.variant)
    share = run(model, data[:4], tmp_path / "s", "attention-share")
    bars = plot.attention_share(share).data
    assert [bar.name for bar in bars] == ["system", "image", "user"]
    assert list(bars[1].y) == pytest.approx(
        share[share.segment == "image"].groupby("layer").share.mean().tolist()
    )
    cliff = run(model, data, tmp_path / "c", "cliff", batch_size=7)
    curve = results.summary(cliff)
    assert list(plot.cliff(cliff_of(curve)).data[0].y) == curve.accuracy.tolist()


def test_cli_on_the_papers_file_formats(tmp_path, capsys):
    """GQA CSV -> knockout with patch flows; POPE JSON lines -> truncation with POPE's metrics."""
    from mmlens.__main__ import main
    from mmlens.zoo.shapes import generate

    choose = generate(3, seed=5, question_types=["ChooseAttr"])
    header = ["question_id", "img_id", "question", "answer", "image_w", "image_h"]
    header += [f"object1 {part}" for part in "xywh"]
    lines = [",".join(header)]
    for index, sample in enumerate(choose):
        sample.image.save(tmp_path / f"img{index}.jpg", quality=95)
        x0, y0, x1, y1 = sample.boxes[0]
        xywh = [x0, y0, x1 - x0 - 1, y1 - y0 - 1]  # the paper's inclusive (x, y, w, h)
        cells = [f"00{index}", f"img{index}", sample.question, sample.answer, "112", "112"]
        lines.append(",".join(map(str, cells + xywh)))
    (tmp_path / "ChooseAttr.csv").write_text("\n".join(lines) + "\n")
    main(["run", "knockout", "--model", "tiny-shapes", "--data",
          f"gqa:{tmp_path / 'ChooseAttr.csv'}", "--images", str(tmp_path), "--out",
          str(tmp_path / "gqa-run"), "--centres", "1", "--window-size", "3", "--all-samples"])  # fmt: skip
    gqa = results.load(tmp_path / "gqa-run")
    assert sorted(gqa.sample_id.unique()) == ["000", "001", "002"]
    assert set(gqa.question_type) == {"ChooseAttr"}
    assert {"Related patches→Question", "Other patches→Question"} <= set(gqa.flow)

    exist = generate(4, seed=6, question_types=["Exist"])
    records = []
    for index, sample in enumerate(exist):
        sample.image.save(tmp_path / f"pope{index}.png")
        records.append(
            {"question_id": index, "image": f"pope{index}.png", "text": sample.question,
             "label": sample.answer}
        )  # fmt: skip
    pope_file = tmp_path / "coco_pope_random.json"
    pope_file.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    main(["run", "truncation", "--model", "tiny-shapes", "--data", f"pope:{pope_file}",
          "--out", str(tmp_path / "pope-run"), "--layers", "2", "--keep", "4"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "precision" in printed and "yes_ratio" in printed
    pope = results.load(tmp_path / "pope-run")
    assert list(pope.condition.unique()) == ["baseline", "layer 2"]
    assert set(pope.label) == {sample.answer for sample in exist}
    assert set(pope.prediction) <= {"yes", "no"}


def test_summary_averages_quantities_not_token_ids(model, shapes, tmp_path):
    lens = run(model, shapes[:2], tmp_path / "lens", "logit-lens")
    summary = results.summary(lens)
    assert "token" not in summary and "sample_index" not in summary
    assert {"variant", "layer", "probability"} <= set(summary.columns)
    # One curve per question type, answer variant and layer: the mean of the samples' rows.
    key = summary.iloc[0]
    rows = lens[
        (lens.question_type == key.question_type)
        & (lens.variant == key.variant)
        & (lens.layer == key.layer)
    ]
    assert key.probability == pytest.approx(rows.probability.mean(), abs=1e-12)
    knockout = results.summary(run(model, shapes[:2], tmp_path / "knockout", centres=[1]))
    assert "answer_token" not in knockout and "relative_change" in knockout
