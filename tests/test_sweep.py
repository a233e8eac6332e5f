"""Answer probabilities and the knockout-sweep engine against the naive loop."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.ablations import drop_tokens, zero_attention, zero_mlp
from mmlens.analysis import (
    PAPER_FLOWS,
    PATCH_FLOWS,
    answer_probability,
    answer_token_ids,
    cliff_layer,
    knockout_sweep,
    module_knockout_jaccard,
    relative_change,
)
from mmlens.testing import make_test_image

N_LAYERS = 6
FLOWS = {**PAPER_FLOWS, **PATCH_FLOWS}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint(n_layers=N_LAYERS, n_kv_heads=2))


@pytest.fixture(scope="module")
def samples(model):
    return [
        model.prepare(make_test_image(88, 48, 0), "What colour is the square on the left?"),
        model.prepare(make_test_image(40, 80, 1), "Is the circle red?"),
    ]


BOXES = [[(0, 0, 30, 20)], [(5, 40, 35, 80), (0, 0, 10, 10)]]


def test_answer_probability_first_and_final_subword(model, samples):
    inp = samples[0]
    logits = model(inp)[0, -1].softmax(-1)
    base = answer_probability(model, inp)
    assert int(base.token_ids[0]) == int(logits.argmax())
    assert torch.allclose(base.probabilities[0], logits.max())

    answer = "zanzibarish"  # not in the test corpus: several sub-words
    ids = answer_token_ids(model, inp, answer)
    assert len(ids) >= 2, "the test needs a multi-token answer"
    first = answer_probability(model, inp, answer)
    assert int(first.token_ids[0]) == ids[0] and torch.allclose(
        first.probabilities[0], logits[ids[0]]
    )
    final = answer_probability(model, inp, answer, subword="final")
    forced = torch.cat((inp.input_ids, torch.tensor([ids[:-1]])), dim=1)
    expected = model(input_ids=forced, pixel_values=inp.pixel_values)[0, -1].softmax(-1)[ids[-1]]
    assert int(final.token_ids[0]) == ids[-1] and torch.allclose(final.probabilities[0], expected)


def test_answer_probability_per_item_of_a_padded_batch(model, samples):
    batch = model.prepare(
        [make_test_image(88, 48, 0), make_test_image(40, 80, 1)],
        ["What colour is the square on the left?", "Is the circle red?"],
    )
    both = answer_probability(model, batch, ["red", "yes"])
    for item, (inp, answer) in enumerate(zip(samples, ["red", "yes"], strict=True)):
        alone = answer_probability(model, inp, answer)
        assert torch.allclose(both.probabilities[item], alone.probabilities[0], atol=1e-6)


def test_relative_change():
    assert relative_change(0.3, 0.4) == pytest.approx(-25.0)


@pytest.mark.parametrize("window_size", [1, 9])
def test_engine_equals_naive_loop_on_every_flow(model, samples, window_size):
    engine = knockout_sweep(model, samples, FLOWS, window_size, boxes=BOXES, progress=False)
    naive = knockout_sweep(
        model, samples, FLOWS, window_size, boxes=BOXES, method="naive", progress=False
    )
    assert len(engine) == len(samples) * len(FLOWS) * N_LAYERS
    assert engine[["sample", "flow", "layer", "answer_token"]].equals(
        naive[["sample", "flow", "layer", "answer_token"]]
    )
    relative_error = ((engine.p_new - naive.p_new).abs() / naive.p_new).max()
    assert relative_error < 1e-5
    assert (engine.p_base - naive.p_base).abs().max() < 1e-6
    assert engine.relative_change.abs().max() > 1.0, "knockouts should move the probability"


def test_engine_in_chunks_and_windows(model, samples):
    whole = knockout_sweep(model, samples[:1], FLOWS, 3, boxes=BOXES[:1], progress=False)
    chunked = knockout_sweep(
        model, samples[:1], FLOWS, 3, boxes=BOXES[:1], batch_size=4, progress=False
    )
    assert (whole.p_new - chunked.p_new).abs().max() < 1e-6
    row = whole[(whole.flow == "Image→Last") & (whole.layer == 0)].iloc[0]
    assert (row.window_start, row.window_end) == (0, 2)
    assert whole.attrs["window_size"] == 3 and whole.attrs["flows"]["Image→Last"] == (
        "image",
        "last",
    )


def test_sweep_errors(model, samples):
    with pytest.raises(ValueError, match="boxes"):
        knockout_sweep(model, samples, {"R": ("related_patches", "question")}, progress=False)
    with pytest.raises(ValueError, match="no key|every key"):
        knockout_sweep(model, samples, {"all": (torch.arange(100), "question")}, progress=False)


@pytest.mark.parametrize("method", ["engine", "naive"])
def test_a_padded_batch_of_samples_gives_the_rows_of_each_sample_alone(model, samples, method):
    batch = model.prepare(
        [make_test_image(88, 48, 0), make_test_image(40, 80, 1)],
        ["What colour is the square on the left?", "Is the circle red?"],
    )
    assert not bool(batch.attention_mask.all()), "the test needs a padded batch"
    together = knockout_sweep(model, batch, FLOWS, 3, boxes=BOXES, method=method, progress=False)
    alone = knockout_sweep(model, samples, FLOWS, 3, boxes=BOXES, method=method, progress=False)
    assert together[["sample", "flow", "layer", "answer_token"]].equals(
        alone[["sample", "flow", "layer", "answer_token"]]
    )
    assert ((together.p_new - alone.p_new).abs() / alone.p_new).max() < 1e-5


# ---------------------------------------------------------------------- module knockout, cliff
def naive_top_words(logits: torch.Tensor, positions: torch.Tensor, k: int) -> set[int]:
    return {int(t) for position in positions for t in logits[0, position].topk(k).indices}


@pytest.mark.parametrize(("module", "zero_at"), [("mlp", "all"), ("attn", "positions")])
def test_module_knockout_jaccard_equals_naive_runs(model, samples, module, zero_at):
    inp = samples[0]
    question = inp.positions("question")
    result = module_knockout_jaccard(
        model, inp, module, window=3, k=5, zero_at=zero_at, batch_size=4, progress=False
    )
    clean = naive_top_words(model(inp), question, 5)
    for row in result.itertuples():
        layers = range(row.layer, min(row.layer + 3, N_LAYERS))
        factory = zero_mlp if module == "mlp" else zero_attention
        hooks = factory(layers, positions=question if zero_at == "positions" else None)
        words = naive_top_words(model.run_with_hooks(inp, fwd_hooks=hooks), question, 5)
        assert row.jaccard == pytest.approx(len(words & clean) / len(words | clean))
        assert row.window_end == layers.stop
    assert result.jaccard.min() < 1.0, "zeroing modules should change some words"


def test_cliff_layer_against_direct_accuracy(model, samples):
    answers = []
    for inp in samples:  # answers the model gets right, so the baseline accuracy is 1
        answers.append(model.to_string([int(model(inp)[0, -1].argmax())]).strip())
    result = cliff_layer(model, samples, answers, tolerance=0.0, progress=False)
    assert result.baseline == 1.0 and result.curve.accuracy.iloc[-1] == 1.0
    for layer in (0, N_LAYERS - 1):
        correct = 0
        for inp, answer in zip(samples, answers, strict=True):
            hooks = drop_tokens(inp.positions("image"), layer)
            predicted = int(model.run_with_hooks(inp, fwd_hooks=hooks)[0, -1].argmax())
            correct += predicted == answer_token_ids(model, inp, answer)[0]
        assert result.curve.accuracy.iloc[layer] == correct / len(samples)
    accuracy = result.curve.accuracy.tolist()
    expected_cliff = next(
        (layer for layer in range(N_LAYERS) if all(a >= 1.0 for a in accuracy[layer:-1])), None
    )
    assert result.cliff_layer == expected_cliff


def test_figures(model, samples):
    from mmlens import plot

    sweep = knockout_sweep(model, samples, window_size=3, progress=False)
    figure = plot.knockout_sweep(sweep)
    bands = [trace for trace in figure.data if trace.fill == "toself"]
    lines = [trace for trace in figure.data if trace.fill != "toself"]
    assert [trace.name for trace in lines] == list(sweep.flow.unique())
    assert len(bands) == len(lines), "two samples: one 95% band per flow"
    means = sweep[sweep.flow == "Image→Last"].groupby("layer").relative_change.mean()
    assert list(lines[0].y) == pytest.approx(list(means))

    jaccard = module_knockout_jaccard(model, samples[0], "mlp", window=3, progress=False)
    assert list(plot.module_knockout_jaccard(jaccard).data[0].y) == list(jaccard.jaccard)
    answers = [model.to_string([int(model(inp)[0, -1].argmax())]).strip() for inp in samples]
    cliff_figure = plot.cliff(cliff_layer(model, samples, answers, progress=False))
    assert len(cliff_figure.data) == 1 and len(cliff_figure.data[0].x) == N_LAYERS + 1
