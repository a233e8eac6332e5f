"""Experiments at data-set scale: one call (or `mmlens run ...`) runs a paper's experiment over a
data set, streams results to a run directory, resumes after any crash, and spreads over
processes, GPUs and nodes (docs/experiments.md).

Examples:
    >>> result = mmlens.run("knockout", "tiny-shapes", "shapes:64", "runs/paper-knockout",
    ...                     preset="cross_modal_flow", window_size=3, centres=[1, 3],
    ...                     progress=False)
    >>> sorted(result.flow.unique())       # the preset's flows: Figures 2-5
    ['Image→Last', 'Image→Question', 'Last→Last', 'Other patches→Question', 'Question→Last', 'Related patches→Question']
    >>> figure = mmlens.plot.knockout_sweep(result, facet="question_type")   # .show()

    The same run from a shell: ``mmlens run knockout --model tiny-shapes --data shapes:64 --out
    runs/paper-knockout --preset cross_modal_flow --window-size 3 --centres 1,3``. Run again, it
    resumes. (The 6-layer organism needs a window narrower than the preset's 9.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import subprocess
import sys
import warnings
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mmlens.analysis import correct_answers
from mmlens.data import Dataset, Sample, from_samples, load, shard_of
from mmlens.experiments.checks import check_layers, check_options
from mmlens.experiments.definitions import EXPERIMENTS, Context, Experiment, required_answer
from mmlens.experiments.integrity import RunLocked, sample_digest
from mmlens.experiments.parallel import Shard, current_shard
from mmlens.experiments.store import Batch, DamagedRun, RunMismatch, RunStore, outcomes
from mmlens.inputs import processor_fingerprint
from mmlens.presets import PRESETS, Preset

__all__ = ["EXPERIMENTS", "DamagedRun", "NothingMeasured", "RunLocked", "RunMismatch", "run"]


def run(
    experiment: str,
    model: Any,
    data: str | Dataset | Iterable[Sample],
    out: str | Path,
    *,
    preset: str | Preset | None = None,
    images: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    correct_only: bool | None = None,
    skip_bad: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    shard: tuple[int, int] | str | None = None,
    progress: bool = True,
    retry_failed: bool = True,
    relabel: bool = False,
    **options: Any,
) -> pd.DataFrame:
    """Run `experiment` over `data` with `model`, writing to `out`; return the results.

    Args:
        experiment: a name in `EXPERIMENTS` (knockout, logit-lens, module-jaccard,
            attention-share, cam, cliff, truncation, fastv, sae-features).
        model: a model, a checkpoint folder, a hub id in the local cache, or a zoo name.
        data: a `Dataset`, samples, or a spec ``"FORMAT:PATH"`` (`mmlens.data.load`).
        out: the run directory. If it holds a run of the same settings and data, that run
            resumes: finished samples are not computed again; other settings, another model
            (by weight content), dtype or device kind, or samples whose content changed are
            refused (`RunMismatch`, naming what differs). One process per rank writes it
            (`integrity.RunLocked` names the holder otherwise).
        preset: a paper preset (`mmlens.presets`, or its name): inputs are prepared with it and
            the analyses take its settings.
        images: the image folder of a data spec.
        batch_size: samples per padded batch.
        limit: only the first `limit` samples of the data set.
        correct_only: keep only samples the model answers correctly (first token) in the
            interpretability experiments; default: the preset's rule (else False). The dropped
            samples are listed in the manifest.
        skip_bad: leave out malformed data rows (listed in the manifest) instead of stopping.
        device: where to load a model given by name (default: the launcher's device for this
            process, else "cpu").
        dtype: the dtype of a model given by name.
        shard: ``(index, count)`` or ``"index/count"``: run one shard of the samples; default:
            from the launcher (accelerate / torchrun / SLURM array), else all.
        progress: show progress bars, and say on stderr how many samples a resumed run
            had done and how many rows `skip_bad` left out.
        retry_failed: run samples that failed in an earlier attempt again (default).
        relabel: label committed batches that have no (readable) manifest with these settings
            instead of refusing them.
        options: the experiment's options (`EXPERIMENTS[name].options`).

    Raises:
        ValueError: an unknown experiment, preset or option, a preset without flows for the
            experiment, or an option value the model cannot take, such as a knockout window
            wider than the model (before anything runs; what needs no model, before it loads).
        NothingMeasured: the run ended with no rows (every sample dropped by the
            correct-answer rule, with what the model answered, or failed); the manifest is
            written first.

    Returns:
        every committed row of the run directory (`mmlens.results.load(out)`), this process'
        and earlier runs' and other ranks' alike.
    """
    from mmlens import results

    spec = _experiment(experiment)
    preset = _preset(preset)
    given = {key for key, value in options.items() if value is not None}
    # Every option that needs no model is refused before the model is loaded; those that
    # count layers, before its weights load (from its config).
    check_options(spec, preset, spec.resolve(options), given)
    described = _described(model)
    early = _layer_defaults(spec, described, preset, spec.resolve(options))
    check_layers(spec, described.cfg.n_layers, preset, early, given)
    this_shard = current_shard(shard, cpu=str(device) == "cpu")
    model, model_identity = _model(model, device or this_shard.device or "cpu", dtype)
    options = _resolved_options(spec, model, preset, options)
    check_options(spec, preset, options, given, model)
    dataset = _dataset(data, images, skip_bad)
    if limit is not None:
        dataset = dataset[:limit]
    if dataset.skipped and progress:
        _say(
            f"left out {len(dataset.skipped)} malformed row(s) of the data (--skip-bad); they "
            f"are listed under skipped_rows in {Path(out) / 'manifest.json'}"
        )
    if correct_only is None:
        correct_only = bool(preset and preset.correct_only)
    correct_only = correct_only and spec.filters_correct
    identity = dict(
        experiment=spec.name,
        options=options,
        preset=preset.name if preset else None,
        correct_only=correct_only,
        model=model_identity,
        data=dict(
            format=dataset.name,
            source=dataset.source,
            n_samples=len(dataset),
            ids=hashlib.sha256("\n".join(dataset.ids).encode()).hexdigest()[:16],
        ),
    )
    mine = [
        (index, sample)
        for index, sample in enumerate(dataset)
        if shard_of(sample.sample_id, this_shard.count) == this_shard.index
    ]
    store = RunStore(out, rank=this_shard.index)
    store.open(identity, details=_environment(model), relabel=relabel)
    try:
        records = store.records(repair=True)  # damaged batches moved aside, to run again
        finished = store.finished(retry_failed=retry_failed, records=records)
        hashes = _sample_hashes(mine, progress)
        _check_data(store, records, hashes)
        todo = [(index, sample) for index, sample in mine if sample.sample_id not in finished]
        if len(todo) < len(mine) and progress:
            _say(
                f"resuming {out}: {len(mine) - len(todo)} of {len(mine)} samples already done, "
                f"{len(todo)} to run"
            )
        context = Context(
            model=model,
            preset=preset,
            options=options,
            dataset=dataset.name,
            max_new_tokens=dataset.max_new_tokens,
        )
        bar = tqdm(
            total=len(todo),
            desc=f"{spec.name} (shard {this_shard.index}/{this_shard.count})",
            unit="sample",
            disable=not progress,
        )
        with bar:
            for batch in _batches(todo, batch_size):
                store.commit(_run_batch(spec, context, batch, correct_only, hashes))
                bar.update(len(batch))
        failed = _finish(store, this_shard, dataset)
    finally:
        store.close()
    result = results.load(out)
    if not len(result):
        raise NothingMeasured(_nothing_measured(store, result))
    if failed:
        first = next(iter(failed.items()))
        warnings.warn(
            f"{len(failed)} sample(s) failed and have no rows (listed in {store.manifest_path}; "
            f"run the same command again to retry them); first: {first[0]}: {first[1]}",
            stacklevel=2,
        )
    return result


class NothingMeasured(ValueError):
    """A run that ended with no rows at all (every sample dropped by the correct-answer rule,
    failed, or none to run); the manifest records why."""


def _nothing_measured(store: RunStore, result: pd.DataFrame) -> str:
    """Why a run has no rows, with the first few reasons (the model's answers for samples
    the correct-answer rule dropped)."""
    dropped, failed = result.attrs["dropped"], result.attrs["failed"]
    n_samples = result.attrs["data"]["n_samples"]
    if dropped and not failed:
        examples = "; ".join(f"{key}: {reason}" for key, reason in list(dropped.items())[:3])
        return (
            f"the run measured nothing: the model answered all {len(dropped)} sample(s) "
            f"wrongly, so the correct-answer rule dropped them ({examples}); check the "
            "model, prompt and preset (the answer instruction must be words the model knows), "
            f"or pass --all-samples / correct_only=False (listed in {store.manifest_path})"
        )
    if failed:
        first = next(iter(failed.items()))
        return (
            f"the run measured nothing: {len(failed)} sample(s) failed and {len(dropped)} were "
            f"dropped (listed in {store.manifest_path}); first failure: {first[0]}: {first[1]}"
        )
    return (
        f"the run measured nothing: the data has {n_samples} sample(s) and none gave a row "
        "(an empty data set, a --limit of 0, or a shard with no samples)"
    )


def _run_batch(
    spec: Experiment,
    context: Context,
    batch: list[tuple[int, Sample]],
    correct_only: bool,
    hashes: dict[str, str],
) -> Batch:
    """One batch: read its images, drop wrongly answered samples if asked, run the experiment
    (alone per sample if the batch fails, so one bad sample does not sink the others). Every
    per-sample step records its error as the sample's failure; the run goes on."""
    result = Batch(
        sample_ids=[sample.sample_id for _, sample in batch],
        hashes={sample.sample_id: hashes[sample.sample_id] for _, sample in batch},
    )
    readable, images = [], {}
    for index, sample in batch:
        try:
            images[sample.sample_id] = sample.load_image()
            readable.append((index, sample))
        except Exception as error:  # noqa: BLE001 - PIL raises many kinds (docs/experiments.md)
            result.failed[sample.sample_id] = f"image: {type(error).__name__}: {error}"
    context = dataclasses.replace(context, images=images)
    if correct_only and readable:
        readable = _correct_only(context, readable, result)
    samples = [sample for _, sample in readable]
    order = {sample.sample_id: index for index, sample in readable}
    try:
        outcomes = [spec.run(context, samples)] if samples else []
    except Exception as error:  # noqa: BLE001 - isolated below: one bad sample must not sink all
        if len(samples) == 1:
            result.failed[samples[0].sample_id] = f"{type(error).__name__}: {error}"
            outcomes = []
        else:
            outcomes = [_alone(spec, context, sample, result) for sample in samples]
    for rows, tensors in outcomes:
        result.rows += [{"sample_index": order[row["sample_id"]], **row} for row in rows]
        result.tensors.update(tensors)
    return result


def _correct_only(
    context: Context, readable: list[tuple[int, Sample]], result: Batch
) -> list[tuple[int, Sample]]:
    """The samples of `readable` the model answers correctly; the others go to
    `result.dropped`, and those the filter fails on (no answer, an error) to `result.failed`."""

    def correct(group: list[tuple[int, Sample]]) -> list[tuple[bool, str]]:
        samples = [sample for _, sample in group]
        answers = [required_answer(sample) for sample in samples]
        inp = context.prepare(samples)
        with torch.no_grad():
            last = context.model(inp)[:, -1]
        verdicts = correct_answers(context.model, inp, answers, last_logits=last).tolist()
        said = [context.model.to_string(token) for token in last.argmax(-1).tolist()]
        return list(zip(verdicts, said, strict=True))

    try:
        verdicts = list(zip(readable, correct(readable), strict=True))
    except Exception:  # noqa: BLE001 - one sample at a time, to fail only the bad one
        verdicts = []
        for pair in readable:
            try:
                verdicts.append((pair, correct([pair])[0]))
            except Exception as error:  # noqa: BLE001 - recorded, reported at the end
                result.failed[pair[1].sample_id] = (
                    f"correct-answer filter: {type(error).__name__}: {error}"
                )
    for (_, sample), (is_correct, said) in verdicts:
        if not is_correct:
            result.dropped[sample.sample_id] = (
                f"answered incorrectly: {said.strip()!r} for {sample.answer!r}"
            )
    return [pair for pair, (is_correct, _) in verdicts if is_correct]


def _alone(
    spec: Experiment, context: Context, sample: Sample, result: Batch
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """`sample` run alone; its error, if any, goes to `result.failed`."""
    try:
        return spec.run(context, [sample])
    except Exception as error:  # noqa: BLE001 - recorded in the manifest, reported at the end
        result.failed[sample.sample_id] = f"{type(error).__name__}: {error}"
        return [], {}


def _finish(store: RunStore, shard: Shard, dataset: Dataset) -> dict[str, str]:
    """Record what the run left out and how far it got (rank 0, once every rank is done);
    return the failed samples. ``complete`` is true only when every sample has rows or was
    dropped by the correct-answer rule: a sample whose every attempt failed keeps it false
    (a resume retries it)."""
    shard.wait_for_everyone()
    result = outcomes(store.records())
    if shard.index == 0:
        store.update_manifest(
            finished=len(result["done"]),
            complete=len(result["done"]) == len(dataset)
            and set(result["done"]) == set(dataset.ids),
            dropped=result["dropped"],
            failed=result["failed"],
            failed_attempts={k: result["attempts"][k] for k in result["failed"]},
            skipped_rows=list(dataset.skipped),
        )
    return result["failed"]


def _sample_hashes(samples: list[tuple[int, Sample]], progress: bool) -> dict[str, str]:
    """Each sample's content hash (`integrity.sample_digest`), its image files read once."""
    cache: dict[str, str] = {}
    return {
        sample.sample_id: sample_digest(sample, cache)
        for _, sample in tqdm(
            samples,
            desc="hashing samples",
            unit="sample",
            disable=not progress or len(samples) < 1000,
        )
    }


def _check_data(store: RunStore, records: list[dict[str, Any]], hashes: dict[str, str]) -> None:
    """Refuse a resume whose samples' content (question, answers, boxes, image) differs from
    what their committed rows were computed with."""
    committed = store.sample_hashes(records)
    changed = [key for key, value in hashes.items() if committed.get(key, value) != value]
    if changed:
        shown = ", ".join(repr(key) for key in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise RunMismatch(
            f"{store.out} holds rows of sample(s) {shown}{more} computed from other content "
            "(question, answers, options, boxes, answer instruction or image bytes changed "
            "under the same ids; e.g. --images points at other pictures); resume with the same "
            "data, or write to another --out directory"
        )


def _batches(todo: list[tuple[int, Sample]], batch_size: int) -> Iterable[list[tuple[int, Sample]]]:
    """Consecutive samples in batches of at most `batch_size` that share an answer
    instruction (one `prepare` call per batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for _, same_suffix in groupby(todo, key=lambda pair: pair[1].suffix):
        group = list(same_suffix)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _say(message: str) -> None:
    """A line for the person running the experiment (on stderr, beside the progress bars)."""
    tqdm.write(message, file=sys.stderr)


def _experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def _preset(preset: str | Preset | None) -> Preset | None:
    if isinstance(preset, str):
        key = preset.lower().replace("-", "_")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[key]
    return preset


def _resolved_options(
    spec: Experiment, model: Any, preset: Preset | None, given: dict[str, Any]
) -> dict[str, Any]:
    """The experiment's options with every default that depends on the model made explicit
    (so the manifest says what ran)."""
    options = _layer_defaults(spec, model, preset, spec.resolve(given))
    if spec.name == "knockout" and options["patch_rule"] is None:  # the manifest says which
        options["patch_rule"] = preset.patch_rule_for(model)[0] if preset else "geometric"
    if spec.name == "logit-lens" and options["apply_final_norm"] is None:
        options["apply_final_norm"] = preset.apply_final_norm if preset else True
    if spec.name == "sae-features" and options["sae"]:  # its content, as the model's
        from mmlens.sae.formats import fingerprint

        options["sae_fingerprint"] = fingerprint(options["sae"])
    return {
        key: list(value) if isinstance(value, tuple) else value for key, value in options.items()
    }


def _layer_defaults(
    spec: Experiment, model: Any, preset: Preset | None, options: dict[str, Any]
) -> dict[str, Any]:
    """`options` with the defaults that count layers made explicit (`model` needs only its
    `cfg` and its family's `paper_window_sizes`)."""
    if spec.name == "knockout" and options["window_size"] is None:
        options["window_size"] = preset.window_size(model) if preset else 9
    if spec.name == "cam" and options["layers"] is None:
        options["layers"] = list(range(model.cfg.n_layers))
    return options


def _described(model: Any) -> Any:
    """A model given by name as far as its config tells (its `cfg` and its family's
    `paper_window_sizes`), without its weights; a loaded model as it is."""
    if not isinstance(model, (str, Path)):
        return model
    from mmlens.loading import quiet_release_noise, read_checkpoint
    from mmlens.models import model_class_for
    from mmlens.zoo import MODELS, checkpoint_path

    name = str(model)
    with quiet_release_noise():
        _, hf_config = read_checkpoint(checkpoint_path(name) if name in MODELS else name)
    family = model_class_for(hf_config.model_type)
    cfg = family.config_from_hf(hf_config, model_name=name)
    return SimpleNamespace(cfg=cfg, paper_window_sizes=family.paper_window_sizes)


def _model(model: Any, device: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The model (loaded if given by name) and what identifies it in the manifest."""
    from mmlens.loading import checkpoint_fingerprint, resolve_checkpoint, weight_files
    from mmlens.models import from_pretrained
    from mmlens.zoo import MODELS, checkpoint_path
    from mmlens.zoo import load as load_zoo

    if isinstance(model, (str, Path)):
        name = str(model)
        if name in MODELS:
            folder, model = checkpoint_path(name), load_zoo(name, dtype=dtype, device=device)
        else:
            folder, model = (
                resolve_checkpoint(name),
                from_pretrained(name, dtype=dtype, device=device),
            )
    else:
        folder = Path(str(model.cfg.model_name))
        # A zoo model keeps its zoo name however it was passed, so that a run resumes either way.
        name = next((zoo for zoo in MODELS if checkpoint_path(zoo) == folder), str(folder))
    has_checkpoint = (folder / "config.json").is_file()
    fingerprint = (
        checkpoint_fingerprint(folder) if has_checkpoint else processor_fingerprint(model.processor)
    )
    files = weight_files(folder, required=False) if has_checkpoint else []
    parameters = list(model.parameters())
    return model, dict(
        name=name,
        fingerprint=fingerprint,
        weight_files=[path.name for path in files],
        template=model.default_template,
        dtype=str(parameters[0].dtype) if parameters else None,
        device=sorted({parameter.device.type for parameter in parameters}),
    )


def _dataset(data: Any, images: Any, skip_bad: bool) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str):
        return load(data, images=images, skip_bad=skip_bad)
    return from_samples(data)


def _environment(model: Any) -> dict[str, Any]:
    """Versions, the git revision of mmlens' checkout (None for an installed wheel) and the
    processor's configuration, for the manifest."""
    import accelerate
    import transformers

    try:
        revision = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parents[1],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        revision = None
    return dict(
        versions=dict(
            mmlens=importlib.metadata.version("mmlens"),
            torch=torch.__version__,
            transformers=transformers.__version__,
            # transformer_lens has no __version__: the installed distribution's.
            transformer_lens=importlib.metadata.version("transformer-lens"),
            accelerate=accelerate.__version__,
            pandas=pd.__version__,
        ),
        git_revision=revision,
        processor=dict(
            fingerprint=processor_fingerprint(model.processor),
            image_processor=model.processor.image_processor.to_dict(),
        ),
    )
