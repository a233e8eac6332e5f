"""The zoo: the synthetic VQA generator, and the shipped trained tiny-shapes model.

Generator: determinism, boxes that are the objects' pixels, answers that an independent oracle
recomputes from the scene, balanced answers. Model: it loads through `mmlens.load` (the
`from_pretrained` path), answers exactly as HF does, keeps its per-type accuracy on a freshly
generated set (seed never used in training or in the docs; the issue's 90% bar is not reached,
see docs/zoo.md), and its attention and LLaVA-CAM put more mass on the question's boxes than
their area (the ground-truth checks; numbers in docs/zoo.md).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import mmlens
from mmlens.inputs import MultimodalInput
from mmlens.testing import hf_position_ids
from mmlens.zoo import MODELS, checkpoint_path
from mmlens.zoo.shapes import (
    BACKGROUND,
    COLORS,
    MARGIN,
    MIDDLE_BAND,
    MIN_SEPARATION,
    PATCH,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    TEMPLATE,
    conversation,
    generate,
    vocabulary,
)
from train.evaluate import cam_box_scores, evaluate

TEST_SEED = 31337
"""Dataset seed of the accuracy test: not the training (1000), training-eval (2000) or docs (7) seed."""
PER_TYPE = 200
CAM_MASS_RATIO = 1.5
CAM_HIT_RATIO = 1.5
POSITION_PROBE_R2 = 0.9  # the shipped model: 0.995 (column), 0.979 (row)


# --- generator ----------------------------------------------------------------------------------


def test_generate_is_deterministic_and_seeded():
    first, again, other = generate(14, seed=3), generate(14, seed=3), generate(14, seed=4)
    for a, b in zip(first, again, strict=True):
        assert (a.question, a.answer, a.boxes, a.objects) == (
            b.question,
            b.answer,
            b.boxes,
            b.objects,
        )
        assert a.image.tobytes() == b.image.tobytes()
    assert [s.question for s in first] != [s.question for s in other]
    assert [s.question_type for s in first] == list(QUESTION_TYPES) * 2
    assert generate(3, seed=3, start=5)[0].question == first[5].question


def test_boxes_are_the_objects_painted_pixels():
    for sample in generate(70, seed=11):
        pixels = np.asarray(sample.image)
        assert sample.image.size == (112, 112)
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.box
            fx0, fy0, fx1, fy1 = obj.footprint
            # a star's tips may round 1 px past its footprint (objects are 2 * MARGIN px apart)
            fx0, fy0, fx1, fy1 = fx0 - 1, fy0 - 1, fx1 + 1, fy1 + 1
            assert fx0 <= x0 < x1 <= fx1 and fy0 <= y0 < y1 <= fy1
            window = pixels[fy0:fy1, fx0:fx1]
            painted = (window == COLORS[obj.color]).all(-1)
            assert ((window == BACKGROUND).all(-1) | painted).all()
            ys, xs = np.nonzero(painted)
            assert (
                xs.min() + fx0,
                ys.min() + fy0,
                xs.max() + fx0 + 1,
                ys.max() + fy0 + 1,
            ) == obj.box
            side = SIZES[obj.size] * PATCH  # the object's cell: whole patches of the grid
            assert fx1 - fx0 == fy1 - fy0 == side - 2 * MARGIN + 2
            assert (fx0 + 1 - MARGIN) % PATCH == 0 and (fy0 + 1 - MARGIN) % PATCH == 0
        cells = [_cells(obj) for obj in sample.objects]
        for i, a in enumerate(cells):  # no two objects share a patch
            for b in cells[i + 1 :]:
                assert not a & b
        assert len({obj.shape for obj in sample.objects}) == len(sample.objects)


def _cells(obj) -> set[tuple[int, int]]:
    x0, y0, x1, y1 = obj.footprint
    return {
        (x // PATCH, y // PATCH)
        for x in range(x0 - MARGIN, x1 + MARGIN, PATCH)
        for y in range(y0 - MARGIN, y1 + MARGIN, PATCH)
    }


def test_objects_are_exactly_their_patches():
    """Every object's pixels lie in its own cell of patches, which no other object touches: the
    patches of its box (`patches_in_box`) are the object's ground truth, nobody else's."""
    for sample in generate(70, seed=15):
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.box
            touched = {(x // PATCH, y // PATCH) for x in (x0, x1 - 1) for y in (y0, y1 - 1)}
            assert touched <= _cells(obj)
            assert len(_cells(obj)) == SIZES[obj.size] ** 2


def oracle(sample) -> str:
    """The answer, recomputed from the scene and the question's words alone."""
    words = sample.question.rstrip("?").replace(",", "").split()
    by_shape = {obj.shape: obj for obj in sample.objects}
    named = [word for word in words if word in SHAPES]
    kind = sample.question_type
    if kind == "ChooseAttr":
        obj = by_shape[named[0]]
        (answer,) = [o for o in sample.options if o in (obj.color, obj.size)]
        return answer
    if kind == "ChooseCat":
        value = words[3]
        (answer,) = [
            s
            for s in sample.options
            if s in by_shape and value in (by_shape[s].color, by_shape[s].size)
        ]
        return answer
    if kind == "ChooseRel":
        a, b = by_shape[named[0]], by_shape[named[1]]
        axis = 0 if "left" in words else 1
        delta = a.center[axis] - b.center[axis]
        assert abs(delta) >= MIN_SEPARATION
        return ("left", "right")[delta > 0] if axis == 0 else ("above", "below")[delta > 0]
    if kind == "CompareAttr":
        a, b = by_shape[named[0]], by_shape[named[1]]
        assert (a.color == b.color) != (a.size == b.size)
        return "color" if a.color == b.color else "size"
    if kind == "LogicalObj":
        colors = [word for word in words if word in COLORS]
        found = [
            s in by_shape and by_shape[s].color == c for c, s in zip(colors, named, strict=True)
        ]
        return "yes" if (any(found) if "either" in words else all(found)) else "no"
    if kind == "QueryAttr":
        obj = by_shape[named[0]]
        if words[0] == "What":
            return obj.color
        assert not MIDDLE_BAND[0] <= obj.center[0] < MIDDLE_BAND[1]
        return "left" if obj.center[0] < MIDDLE_BAND[0] else "right"
    return "yes" if named[0] in by_shape else "no"


def test_answers_match_an_oracle_and_boxes_are_the_named_objects():
    for sample in generate(350, seed=12):
        assert oracle(sample) == sample.answer, sample
        named = [word.strip("?,") for word in sample.question.split() if word.strip("?,") in SHAPES]
        present = [obj for shape in named for obj in sample.objects if obj.shape == shape]
        assert sample.referred == tuple(present)
        assert sample.boxes == tuple(obj.box for obj in present)
        if sample.question_type.startswith("Choose"):
            assert len(sample.options) == 2 and sample.answer in sample.options
            assert " or " in sample.question


def test_answers_are_balanced():
    counts = collections.defaultdict(collections.Counter)
    for sample in generate(7 * 300, seed=13):
        counts[sample.question_type][sample.answer] += 1
    for kind in ("LogicalObj", "Exist", "CompareAttr"):
        assert 0.4 < max(counts[kind].values()) / 300 < 0.6, counts[kind]
    for kind in (
        "ChooseAttr",
        "ChooseCat",
        "ChooseRel",
    ):  # the first option is not the answer's tell
        first = [s.answer == s.options[0] for s in generate(300, seed=13, question_types=[kind])]
        assert 0.4 < np.mean(first) < 0.6
    assert min(counts["ChooseRel"].values()) > 50  # left, right, above, below
    assert len(counts["ChooseCat"]) == len(SHAPES)


def test_follow_up_turns_are_answered_from_the_same_scene():
    for sample in generate(70, seed=14):
        turns = conversation(sample, 8)
        assert turns[0].question == sample.question and len(turns) == 8
        for turn in turns[1:]:
            clone = type(sample)(**{**sample.__dict__, "question": turn.question,
                                    "question_type": turn.question_type, "answer": turn.answer,
                                    "options": _options(turn.question)})  # fmt: skip
            assert oracle(clone) == turn.answer, turn


@pytest.mark.parametrize("color_lures", [0.0, 1.0])
def test_color_lures_name_another_objects_colour(color_lures):
    """With `color_lures=1` every wrong colour a LogicalObj follow-up names for a shape in the
    image is the colour of another object of the scene (where one differs), and answers stay
    right; at 0 (the evaluation sets' rule) it is any other colour, a lure only by chance."""
    lures = wrong = 0
    for sample in generate(140, seed=15, n_objects=(3, 4)):
        turns = conversation(sample, 12, ["LogicalObj"], color_lures=color_lures)
        colors = {obj.shape: obj.color for obj in sample.objects}
        for turn in turns[1:]:
            clone = dataclasses.replace(sample, question=turn.question, answer=turn.answer,
                                        question_type="LogicalObj", options=())  # fmt: skip
            assert oracle(clone) == turn.answer, turn
            words = turn.question.rstrip("?").split()
            for color, shape in [(words[-6], words[-5]), (words[-2], words[-1])]:
                others = set(colors.values()) - {colors.get(shape)}
                if shape in colors and color != colors[shape] and others:
                    wrong += 1
                    lures += color in others
    assert wrong > 200
    if color_lures:
        assert lures == wrong
    else:
        assert 0.2 < lures / wrong < 0.7  # 1-3 other colours in the scene, of 5 wrong ones


def test_swapped_twins_differ_only_in_which_colour_goes_with_which_shape():
    """`conversation(..., swapped_twins=1)` follows LogicalObj follow-ups with their twin: the same
    words with the two colours exchanged, the other answer (right by the oracle). At 0 the
    conversation is the one without twins, draw for draw."""
    twins = 0
    for sample in generate(60, seed=16, n_objects=(2, 3, 4)):
        plain = conversation(sample, 12, ["LogicalObj"], color_lures=0.75)
        assert (
            conversation(sample, 12, ["LogicalObj"], color_lures=0.75, swapped_twins=0.0) == plain
        )
        turns = conversation(sample, 12, ["LogicalObj"], color_lures=0.75, swapped_twins=1.0)
        assert len(turns) == 12
        for turn in turns[1:]:
            clone = dataclasses.replace(sample, question=turn.question, answer=turn.answer,
                                        question_type="LogicalObj", options=())  # fmt: skip
            assert oracle(clone) == turn.answer, turn
        for first, second in itertools.pairwise(turns[1:]):
            swapped = first.question.split()
            swapped[-6], swapped[-2] = swapped[-2], swapped[-6]
            if second.question.split() == swapped:
                twins += 1
                assert first.answer != second.answer
    assert twins > 100


def _options(question: str) -> tuple[str, ...]:
    words = question.rstrip("?").replace(",", "").split()
    if " or " not in question or "either" in words:
        return ()
    at = words.index("or")
    if words[at - 1] == "left" or words[at - 1] == "right":
        return (words[at - 1], words[at + 3])
    return (words[at - 1], words[at + 1] if words[at + 1] != "the" else words[at + 2])


# --- training machinery --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_objects", "n_questions", "counts"),
    [((2, 3, 4), 4, [4, 4, 4]), ((1, 2), 40, [35, 35, 40])],
    ids=["same-count", "one-object-scenes-support-fewer"],
)
def test_shared_prefix_loss_equals_separate_prompts(n_objects, n_questions, counts):
    """The training loss (prefix run once per image, questions on its repeated cache) is the loss
    of the full single-turn prompts that `model.prepare` renders, gradients included, whether
    every image gets the same number of questions or not."""
    from train import train_shapes

    torch.set_num_threads(2)
    processor = train_shapes.make_processor()
    model = train_shapes.build_model(seed=0).train()
    samples = generate(3, seed=5, n_objects=n_objects)
    conversations = [conversation(sample, n_questions) for sample in samples]
    assert [len(turns) for turns in conversations] == counts
    shared = train_shapes.shared_prefix_loss(model, processor, samples, conversations)
    separate = []
    for sample, turns in zip(samples, conversations, strict=True):
        for turn in turns:
            separate.append(dataclasses.replace(sample, question=turn.question, answer=turn.answer))
    batch = train_shapes.collate(processor, separate, padding_side="right")
    reference = model(**batch).loss
    assert torch.allclose(shared, reference, atol=1e-5)
    weight = model.model.vision_tower.embeddings.patch_embedding.weight
    (shared_grad,) = torch.autograd.grad(shared, weight)
    (reference_grad,) = torch.autograd.grad(reference, weight)
    assert torch.allclose(shared_grad, reference_grad, atol=1e-5 * reference_grad.abs().max())
    # and the prompts are token for token what `model.prepare` builds
    prompts = train_shapes.collate(processor, separate, with_answers=False)
    inp = MultimodalInput.from_processor(
        processor, [s.image for s in separate], [s.question for s in separate], template=TEMPLATE
    )
    assert torch.equal(prompts["input_ids"], inp.input_ids)
    assert torch.equal(prompts["pixel_values"], inp.pixel_values)


def test_question_weight_adds_the_language_modelling_loss_of_the_questions():
    """`shared_prefix_loss(..., question_weight=w)` adds w times the mean next-token loss of the
    prompt text between the image and the answer (from its second token on), measured here on
    the full separate prompts."""
    from train import train_shapes

    torch.set_num_threads(2)
    processor = train_shapes.make_processor()
    model = train_shapes.build_model(seed=0).eval()
    samples = generate(2, seed=6, n_objects=(2, 3))
    conversations = [conversation(sample, 3) for sample in samples]
    with torch.no_grad():
        answers_only = train_shapes.shared_prefix_loss(model, processor, samples, conversations)
        weighted = train_shapes.shared_prefix_loss(model, processor, samples, conversations, 0.3)
        separate = [
            dataclasses.replace(sample, question=turn.question, answer=turn.answer)
            for sample, turns in zip(samples, conversations, strict=True)
            for turn in turns
        ]
        batch = train_shapes.collate(processor, separate, padding_side="right")
        log_probs = model(**batch).logits.log_softmax(-1)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    losses = []
    for row, ids in enumerate(batch["input_ids"]):
        first_text = int((ids == image_id).nonzero().max()) + 2  # the suffix's second token
        answer = int((batch["labels"][row] != -100).nonzero().min())
        for position in range(first_text, answer):
            losses.append(-log_probs[row, position - 1, ids[position]])
    assert len(losses) > 6 * len(separate)
    expected = answers_only + 0.3 * torch.stack(losses).mean()
    assert torch.allclose(weighted, expected, atol=1e-5)


def test_a_warm_restart_continues_the_saved_weights(tmp_path):
    """`train(resume_from=...)` starts from the saved folder (not a fresh init) and numbers its
    steps from `first_step`, so the curriculum and the image stream go on where they stopped."""
    from train import train_shapes

    lines = []
    kwargs = dict(batch_size=1, n_questions=2, eval_per_type=1, threads=2, log=lines.append)
    first = train_shapes.train(out=tmp_path, steps=1, **kwargs)
    again = train_shapes.train(
        out=None, steps=1, lr=0.0, resume_from=tmp_path, first_step=1, **kwargs
    )
    for (name, before), after in zip(
        first.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(before, after), name
    fresh = train_shapes.build_model(seed=0).state_dict()
    assert not torch.equal(fresh["lm_head.weight"], again.state_dict()["lm_head.weight"])
    assert lines[-1].startswith("step 2/2 ")


def test_patch_targets_label_every_patch_of_each_objects_cell():
    """`pretrain_vision`'s labels: the patches of an object's cell (footprint plus `MARGIN`) carry
    its shape, colour, size and centre; every other patch is background (0)."""
    from mmlens.zoo.shapes import COLORS, MARGIN, PATCH, SHAPES, SIZES
    from train import train_shapes

    samples = generate(6, seed=11)
    target = train_shapes.patch_targets(samples)
    assert target["shape"].shape == (6, 64) and target["center"].shape == (6, 64, 2)
    for index, sample in enumerate(samples):
        expected = torch.zeros(64, dtype=torch.long)
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.footprint
            side = SIZES[obj.size]
            column, row = (x0 - MARGIN) // PATCH, (y0 - MARGIN) // PATCH
            assert (x1 - x0 + 2 * MARGIN, y1 - y0 + 2 * MARGIN) == (side * PATCH, side * PATCH)
            cell = [8 * (row + r) + column + c for r in range(side) for c in range(side)]
            expected[cell] = SHAPES.index(obj.shape) + 1
            assert (target["color"][index, cell] == list(COLORS).index(obj.color) + 1).all()
            assert (target["size"][index, cell] == list(SIZES).index(obj.size) + 1).all()
            centre = torch.tensor(obj.center) / PATCH - 4
            assert torch.equal(target["center"][index, cell], centre.expand(len(cell), 2))
        assert torch.equal(target["shape"][index], expected)
        background = expected == 0
        assert (target["color"][index, background] == 0).all()
        assert (target["center"][index, background] == 0).all()


def test_vision_pretraining_changes_only_the_tower_and_freezing_keeps_it(tmp_path):
    """`pretrain_vision` trains the vision tower alone (its heads are dropped); `train` with
    `freeze_vision` then leaves the tower's weights as they were while the rest trains."""
    from train import train_shapes

    torch.set_num_threads(2)
    fresh = train_shapes.build_model(seed=0)
    model = train_shapes.build_model(seed=0)
    lines = []
    scores = train_shapes.pretrain_vision(
        model, train_shapes.make_processor(), steps=3, batch_size=2, log=lines.append
    )
    assert set(scores) == {"shape", "color", "size", "center_error"}
    assert lines[-1].startswith("vision step 3/3 ")
    assert model.state_dict().keys() == fresh.state_dict().keys()
    for name, weight in model.state_dict().items():
        if not name.startswith("model.vision_tower."):
            assert torch.equal(weight, fresh.state_dict()[name]), name
    assert not torch.equal(
        model.model.vision_tower.embeddings.patch_embedding.weight,
        fresh.model.vision_tower.embeddings.patch_embedding.weight,
    )

    kwargs = dict(batch_size=1, n_questions=2, eval_per_type=1, threads=2, log=lines.append)
    trained = train_shapes.train(out=None, steps=2, vision_steps=2, freeze_vision=True, **kwargs)
    pretrained = train_shapes.build_model(seed=0)
    train_shapes.pretrain_vision(pretrained, train_shapes.make_processor(), steps=2, log=[].append)
    for name, weight in pretrained.model.vision_tower.state_dict().items():
        assert torch.equal(weight, trained.model.vision_tower.state_dict()[name]), name
    assert not torch.equal(pretrained.lm_head.weight, trained.lm_head.weight)


# --- the shipped model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return mmlens.load("tiny-shapes")


def test_load_rejects_unknown_names_and_explains_a_missing_checkpoint(monkeypatch):
    assert set(MODELS) == {"tiny-shapes", "tiny-shapes-routed"}
    with pytest.raises(ValueError, match="shipped models: tiny-shapes"):
        mmlens.load("no-such-model")
    monkeypatch.setitem(MODELS, "not-installed", "a name whose package data is missing")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        mmlens.load("not-installed")
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    # every shipped model's folder (and the zoo's SAE, mmlens.sae.ZOO_SAES) is package data
    assert (
        '"mmlens.zoo" = ["tiny-shapes/*", "tiny-shapes-routed/*", "tiny-shapes-sae/*"]' in pyproject
    )


def test_checkpoint_ships_as_package_data_and_loads_through_from_pretrained(model):
    folder = checkpoint_path("tiny-shapes")
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    assert sum((folder / name).stat().st_size for name in files) < 16 * 2**20
    assert isinstance(model, mmlens.HookedLlava)
    cfg = model.cfg
    assert cfg.n_layers >= 6 and cfg.vision.patch_size == 14 and cfg.projector_hidden_act == "gelu"


@pytest.fixture(scope="module")
def architecture(tmp_path_factory):
    """An untrained model of tiny-shapes' architecture, tokenizer and processor, saved and loaded
    as the shipped one is (so these checks run whether or not a trained checkpoint ships)."""
    from train import train_shapes

    folder = tmp_path_factory.mktemp("tiny-shapes-untrained")
    train_shapes.build_model(seed=0).eval().save_pretrained(folder)
    train_shapes.make_processor().save_pretrained(folder)
    return folder


def test_tokenizer_is_word_level_and_segments_cover_the_question(architecture):
    model = mmlens.from_pretrained(architecture)
    tokenizer = model.tokenizer
    assert tokenizer.unk_token_id not in tokenizer(" ".join(vocabulary())).input_ids
    samples = generate(7, seed=TEST_SEED)
    inp = model.prepare([s.image for s in samples], [s.question for s in samples])
    for item, sample in enumerate(samples):
        question = tokenizer.convert_ids_to_tokens(
            inp.input_ids[item, inp.positions("question", item)]
        )
        assert "".join(question) == sample.question.replace(" ", "")
        assert len(inp.positions("image", item)) == 64
        last = tokenizer.convert_ids_to_tokens(
            int(inp.input_ids[item, inp.positions("last", item)])
        )
        assert last == ":"
        assert inp.positions("system", item).numel() > 30  # the LLaVA-1.5 system prompt


def test_architecture_answers_exactly_as_hugging_face(architecture):
    model = mmlens.from_pretrained(architecture)
    assert isinstance(model, mmlens.HookedLlava)
    cfg = model.cfg
    assert cfg.n_layers >= 6 and cfg.vision.patch_size == 14 and cfg.projector_hidden_act == "gelu"
    hf = LlavaForConditionalGeneration.from_pretrained(architecture).eval()
    samples = generate(7, seed=TEST_SEED + 1)
    inp = model.prepare([s.image for s in samples], [s.question for s in samples])
    with torch.no_grad():
        expected = hf(**inp.model_kwargs(), position_ids=hf_position_ids(inp.attention_mask)).logits
        logits = model(inp)
        generated = hf.generate(**inp.model_kwargs(), max_new_tokens=3, do_sample=False)
    real = inp.attention_mask.bool()
    assert (expected - logits)[real].abs().max() < 1e-4
    assert torch.equal(model.generate(inp, max_new_tokens=3), generated)


def test_shipped_model_answers_then_stops(model):
    samples = generate(8, seed=TEST_SEED + 1, question_types=["ChooseAttr", "Exist"])
    inp = model.prepare([s.image for s in samples], [s.question for s in samples])
    generated = model.generate(inp, max_new_tokens=2)
    n_prompt = inp.input_ids.shape[1]
    answers = model.tokenizer.convert_ids_to_tokens(generated[:, n_prompt].tolist())
    assert generated[:, n_prompt + 1].eq(model.tokenizer.eos_token_id).all()
    assert answers == [s.answer for s in samples]  # the two types the model has solved


@pytest.fixture(scope="module")
def evaluation(model):
    return evaluate(model, generate(PER_TYPE * len(QUESTION_TYPES), seed=TEST_SEED))


ACCURACY_BAR = 0.90
"""The issue's bar for every question type on a freshly generated set, `PER_TYPE` samples each
(the shipped model's scores here are in docs/zoo.md). 200 a type, because at 48 the standard
error of a 93% rate is ±3.7 points: which 48 samples were drawn would decide a 90% bar."""


def test_image_features_carry_object_positions(model):
    """The image tokens tell the decoder where an object is: a linear map fitted on the projected
    features of half the objects (mean over each object's patches) reads the other half's centre
    column and row (R² on held-out objects; 0 is the mean's guess). Without this no "left of" or
    "which part" question can be answered: trained end to end from CLIP's default
    position-embedding init, the features carried no position at all (R² below 0;
    `train_shapes.build_model`, `train_shapes.pretrain_vision`)."""
    samples = generate(300, seed=TEST_SEED + 3)
    inp = model.prepare([s.image for s in samples], [s.question for s in samples])
    _, cache = model.run_with_cache(inp, names_filter="hook_image_embeds")
    features, centres = [], []
    for item, sample in enumerate(samples):
        for obj in sample.objects:
            x0, y0, x1, y1 = (edge // PATCH for edge in obj.footprint)
            # the 8 x 8 grid row-major (CLS dropped)
            patches = [8 * row + col for row in range(y0, y1 + 1) for col in range(x0, x1 + 1)]
            features.append(cache["hook_image_embeds"][item, patches].mean(0))
            centres.append([(x0 + x1) / 2, (y0 + y1) / 2])
    features = torch.cat([torch.stack(features), torch.ones(len(features), 1)], dim=1)
    centres = torch.tensor(centres)
    half = len(centres) // 2
    probe = torch.linalg.lstsq(features[:half], centres[:half]).solution
    error = features[half:] @ probe - centres[half:]
    r2 = 1 - error.pow(2).mean(0) / centres[half:].var(0)
    assert (r2 > POSITION_PROBE_R2).all(), f"R² of the column, row probes: {r2.tolist()}"


def test_every_question_type_is_answered_at_least_90_percent(evaluation):
    """Held-out accuracy per type on a new seed (answering from the text alone gives about 50%)."""
    assert set(evaluation.accuracy) == set(QUESTION_TYPES)
    low = {kind: acc for kind, acc in evaluation.accuracy.items() if acc < ACCURACY_BAR}
    assert not low, f"below {ACCURACY_BAR:.0%}: {low}\n{evaluation.accuracy_table()}"


def test_attention_lands_on_the_question_boxes_in_the_middle_layers(evaluation):
    """The ground-truth check (docs/zoo.md has the per-layer numbers on 1400 samples).

    Verified property: in the middle layers the last position's attention over the image puts
    clearly more mass on the named objects' patches than their share of the image, on average,
    and its most attended patch lies on a named object more often than area alone would give.
    """
    mass = evaluation.mass_in_box.mean(0)
    area = evaluation.area_share.mean()
    hits = evaluation.pointing_hit.float().mean(0)
    middle = range(
        evaluation.mass_in_box.shape[1] // 2 - 1, evaluation.mass_in_box.shape[1] // 2 + 1
    )
    assert len(evaluation.area_share) > 0.8 * len(evaluation.correct)
    assert math.isclose(float(area), float(evaluation.area_share.mean()))
    best = max(middle, key=lambda layer: float(mass[layer]))
    assert mass[best] > 1.5 * area, f"layer {best}: {mass[best]:.3f} vs area {area:.3f}"
    assert hits[best] > area


def test_llava_cam_lands_on_the_question_boxes(model):
    """The ground-truth check for LLaVA-CAM (docs/zoo.md): averaged over samples, the best
    layer's map puts clearly more of its mass on the named objects' patches than their share of
    the image, and its maximum falls on them more often than area alone would give."""
    scores = cam_box_scores(model, generate(3 * len(QUESTION_TYPES), seed=TEST_SEED + 2))
    best = int(scores.mass_in_box.argmax())
    area = scores.area_share
    assert scores.mass_in_box[best] > CAM_MASS_RATIO * area, scores.table()
    assert scores.pointing_hit[best] > CAM_HIT_RATIO * area, scores.table()


def test_to_str_tokens_of_a_prepared_input(model):
    samples = generate(2, seed=0)
    inp = model.prepare(samples[0].image, samples[0].question)
    strings = model.to_str_tokens(inp)
    assert strings == model.tokenizer.convert_ids_to_tokens(inp.input_ids[0].tolist())
    assert strings[-8:] == ["the", "star", "blue", "or", "red", "?", "ASSISTANT", ":"]
    image_token = model.tokenizer.convert_ids_to_tokens(model.cfg.image_token_id)
    assert strings.count(image_token) == len(inp.positions("image")) == 64
    batch = model.prepare([s.image for s in samples], [s.question for s in samples])
    per_item = model.to_str_tokens(batch)
    assert len(per_item) == 2
    for index, tokens in enumerate(per_item):  # each without its padding
        assert tokens == model.to_str_tokens(batch.item(index))
        assert len(tokens) == int(batch.attention_mask[index].sum())


def test_unknown_words_are_reported_once(model, monkeypatch):
    from mmlens.inputs import arguments
    from mmlens.presets import CROSS_MODAL_FLOW

    monkeypatch.setattr(arguments, "_REPORTED_UNKNOWN", set())
    samples = generate(3, seed=0)
    with pytest.warns(UserWarning) as caught:
        for sample in samples:  # the preset's answer instruction is outside the vocabulary
            inp = model.prepare(sample.image, sample.question, preset=CROSS_MODAL_FLOW)
        model.prepare([s.image for s in samples], [s.question for s in samples],
                      preset=CROSS_MODAL_FLOW)  # fmt: skip
    unknown = [str(w.message) for w in caught if "does not know" in str(w.message)]
    assert unknown == [
        "the tokenizer does not know the word(s) 'Answer', 'phrase', 'question', 'single', "
        "'using', 'word': the model reads <unk> for each (reported once); a word-level "
        "vocabulary knows only the words it was trained on, so leave them out of the prompt "
        "(e.g. a preset's answer instruction: prepare without the preset's suffix, suffix=...)"
    ]
    assert int((inp.input_ids == model.tokenizer.unk_token_id).sum()) == 6
    with pytest.warns(UserWarning, match=r"does not know the word\(s\) 'zebra'"):
        model.prepare(samples[0].image, "Is the zebra red?")
