"""The `mmlens` command as a user meets it (docs/experiments.md, "The command line"): a mistake
ends in one line on stderr and a non-zero exit, never a traceback unless `--debug` asks; a run
that measures nothing says so; `--help` answers without importing torch.

The real command runs in a subprocess where the process matters (help without torch, an error
after the model loads, `--debug`, Ctrl-C); the other cases call `main` in this process, which is
the same code without the cost of loading torch again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmlens import experiments
from mmlens.__main__ import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, main
from mmlens.zoo.shapes import generate

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
KNOCKOUT = ["run", "knockout", "--model", "tiny-shapes", "--data", "shapes:4", "--device", "cpu"]


def mmlens(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mmlens", *args],
        env=ENVIRONMENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def fails(capsys, argv: list[str], code: int = EXIT_ERROR) -> str:
    """Run `main(argv)`, which must exit with `code`, its stderr ending in one error line (after
    progress bars and warnings, if any) and holding no traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    stderr = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in stderr.strip().splitlines()]
    assert "Traceback" not in stderr and [": error: " in line for line in lines][-1:] == [True]
    assert sum(": error: " in line for line in lines) == 1, stderr
    return lines[-1]


def test_help_and_version_answer_without_importing_torch():
    probe = (
        "import sys\nfrom mmlens.__main__ import main\n"
        "for argv in (['--help'], ['run', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
        "print('heavy:', sorted({'torch', 'transformers', 'pandas'} & set(sys.modules)))"
    )
    help_run = subprocess.run(
        [sys.executable, "-c", probe], env=ENVIRONMENT, capture_output=True, text=True
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "--window-size" in help_run.stdout and "--debug" in help_run.stdout
    assert help_run.stdout.strip().splitlines()[-1] == "heavy: []"
    version = mmlens("--version").communicate()[0]
    assert version.strip() == f"mmlens {__import__('mmlens').__version__}"


def test_an_error_after_the_model_loads_is_one_line_and_debug_shows_the_traceback(tmp_path):
    # A 9-layer window (the preset's for an unknown model) on the 6-layer organism: every window
    # covers nearly all layers, every curve would be flat. Refused before anything is written.
    args = [*KNOCKOUT, "--preset", "cross_modal_flow", "--out", str(tmp_path / "run")]
    plain, debug = mmlens(*args), mmlens(*args, "--debug")
    (_, plain_err), (_, debug_err) = plain.communicate(), debug.communicate()
    assert plain.returncode == EXIT_ERROR and debug.returncode == 1
    assert plain_err.strip().splitlines() == [
        "mmlens run: error: experiment 'knockout': window_size=9 (the default of preset "
        "'cross_modal_flow' for this model) is wider than the model's 6 decoder layers, so every "
        "window covers (nearly) all of them and every curve comes out flat; pass a narrower "
        "--window-size (window_size=), e.g. 3"
    ]
    assert debug_err.startswith("Traceback") and "ValueError: experiment 'knockout'" in debug_err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    out = tmp_path / "run"
    args = ["--data", "shapes:2000", "--window-size", "3", "--batch-size", "2", "--out", str(out)]
    process = mmlens(*KNOCKOUT[:-4], *args, "--device", "cpu")
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "parts").glob("*.json")):
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED
    assert "Traceback" not in stderr
    # The progress bar shares stderr; the last line is the message.
    last = stderr.strip().splitlines()[-1].split("\r")[-1]
    assert last == "mmlens run: interrupted; run the same command again to resume"
    assert json.loads((out / "manifest.json").read_text())["identity"]["experiment"] == "knockout"


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the mistake must be found before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(experiments, "_model", refuse)


def test_option_mistakes_are_refused_before_the_model_loads(capsys, tmp_path, no_model_load):
    out = ["--out", str(tmp_path / "run")]
    assert fails(capsys, [*KNOCKOUT, *out, "--preset", "cross_modal"]) == (
        "mmlens run: error: unknown preset 'cross_modal'; presets: cross_modal_flow, "
        "redundancy_to_relevance, redundancy_to_relevance_cam"
    )
    with pytest.raises(ValueError, match="unknown preset 'cross_modal'"):  # --debug: raised
        main(["--debug", *KNOCKOUT, *out, "--preset", "cross_modal"])
    line = fails(capsys, [*KNOCKOUT, *out, "--flows", "Image→Last,Imag→Last"])
    assert line.startswith(
        "mmlens run: error: experiment 'knockout': unknown flow(s) ['Imag→Last']"
    )
    assert "Image→Question" in line
    assert fails(capsys, [*KNOCKOUT, *out, "--preset", "redundancy_to_relevance"]) == (
        "mmlens run: error: preset 'redundancy_to_relevance' has no knockout flows, so the run "
        "would measure nothing; use --preset cross_modal_flow, or no preset (every flow)"
    )
    assert fails(capsys, [*KNOCKOUT, *out, "--patch-rule", "box"]).endswith(
        "patch_rule='box' is not one of 'mask', 'geometric'"
    )
    # argparse's own mistakes: one line too, with the closest name.
    assert fails(capsys, ["run", "knockot", "--model", "m", "--data", "d", *out], EXIT_USAGE)
    line = fails(capsys, [*KNOCKOUT, *out, "--flowz", "x"], EXIT_USAGE)
    assert "unrecognized arguments: --flowz x; did you mean --flows?" in line
    assert not (tmp_path / "run").exists()


def test_a_misspelt_model_name_never_tries_the_hub(capsys, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    connections, lookups = [], []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: connections.append(a))
    original = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        lookups.append(kwargs.get("local_files_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    line = fails(capsys, [*KNOCKOUT[:3], "tiny-shape", *KNOCKOUT[4:], "--out", str(tmp_path / "r")])
    assert line.startswith(
        "mmlens run: error: model 'tiny-shape' is not a checkpoint folder, a zoo name "
        "(tiny-shapes, tiny-shapes-routed) or a hub id in the local Hugging Face cache"
    )
    assert "did you mean 'tiny-shapes'?" in line and "`hf download tiny-shape`" in line
    assert lookups == [True] and connections == []


def test_resume_reports_what_was_done_and_refuses_other_settings(capsys, tmp_path):
    args = [*KNOCKOUT, "--out", str(tmp_path / "run"), "--window-size", "3", "--centres", "1"]
    main(args)
    assert "resuming" not in capsys.readouterr().err
    main(args)
    assert f"resuming {tmp_path / 'run'}: 4 of 4 samples already done, 0 to run" in (
        capsys.readouterr().err
    )
    line = fails(capsys, [*args, "--window-size", "2"])
    assert "holds a run with other settings" in line and "window_size: 3 there, 2 now" in line


def write_questions(folder: Path, rows: list[str]) -> Path:
    """A custom-format CSV (docs/data.md) over shapes images saved in `folder`."""
    for index, sample in enumerate(generate(2, seed=0)):
        sample.image.save(folder / f"{index}.png")
    questions = folder / "questions.csv"
    questions.write_text("\n".join(["sample_id,question,image,answer", *rows]) + "\n")
    return questions


def test_a_run_that_keeps_no_sample_says_what_the_model_answered(capsys, tmp_path):
    # Answers the organism never gives: the correct-answer rule drops every sample.
    data = write_questions(
        tmp_path,
        ["a,Is the star blue or red?,0.png,banana", "b,What shape is the object?,1.png,kiwi"],
    )
    out = tmp_path / "run"
    line = fails(
        capsys,
        [*KNOCKOUT[:5], f"csv:{data}", "--out", str(out), "--window-size", "3", "--correct-only"],
    )
    assert line.startswith(
        "mmlens run: error: the run measured nothing: the model answered all 2 sample(s) "
        "wrongly, so the correct-answer rule dropped them (a: answered incorrectly: 'red' for "
        "'banana'; b: answered incorrectly: "
    )
    assert line.endswith(
        f"or pass --all-samples / correct_only=False (listed in {out}/manifest.json)"
    )
    assert set(json.loads((out / "manifest.json").read_text())["dropped"]) == {"a", "b"}


def test_a_data_error_names_the_row_and_skip_bad_reports_what_it_left_out(capsys, tmp_path):
    data = write_questions(
        tmp_path, ["a,Is the star blue or red?,0.png,red", "b,What shape?,missing.png,star"]
    )
    out = tmp_path / "run"
    line = fails(capsys, [*KNOCKOUT[:5], f"csv:{data}", "--out", str(out), "--window-size", "3"])
    assert line == (
        f"mmlens run: error: {data}, row 2, field 'image': image file {tmp_path / 'missing.png'} "
        "does not exist; fix the row, or pass --skip-bad to leave such rows out (the manifest "
        "lists them)"
    )
    main([*KNOCKOUT[:5], f"csv:{data}", "--out", str(out), "--window-size", "3", "--skip-bad"])
    assert (
        f"left out 1 malformed row(s) of the data (--skip-bad); they are listed under "
        f"skipped_rows in {out}/manifest.json"
    ) in capsys.readouterr().err
    skipped = json.loads((out / "manifest.json").read_text())["skipped_rows"]
    assert len(skipped) == 1 and "row 2" in skipped[0] and "missing.png" in skipped[0]
