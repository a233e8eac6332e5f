"""Score a model on `mmlens.zoo.shapes` samples: accuracy per question type, and where the last
position's attention over the image lands relative to the question's ground-truth boxes.

Both numbers in docs/zoo.md come from `evaluate` (``python -m train.evaluate`` prints them).

Attention in the box, per decoder layer ``l`` and sample: the attention row of the last prompt
position (the ':' of "ASSISTANT:", where the answer is predicted) in
``blocks.{l}.attn.hook_pattern``, averaged over heads, restricted to the image tokens and
normalised to sum to 1 there; `mass_in_box` is the part of it on ``inp.patches_in_box(box)`` for
the union of the sample's boxes, `area_share` the share of image tokens those patches are (what
attention spread uniformly over the image would give), and `pointing_hit` whether the single most
attended image token lies in the box (the pointing game). Samples whose question names no object
that is in the image (some Exist / LogicalObj "no" questions) have no box and are left out of
these three.

Example:
    >>> result = evaluate(mmlens.load("tiny-shapes"), generate(70, seed=7))
    >>> result.accuracy["ChooseRel"], result.mass_in_box.mean(0)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from mmlens.analysis import box_scores, correct_answers
from mmlens.zoo.shapes import QUESTION_TYPES, TEMPLATE, ShapesSample, generate


@dataclass
class Evaluation:
    """What `evaluate` measured.

    Attributes:
        question_types: the type of each sample, in order.
        correct: whether the greedy first answer token was the answer word, per sample.
        accuracy: fraction correct per question type.
        has_box: per sample, whether it entered the attention numbers.
        mass_in_box: ``[n_with_box, n_layers]`` attention share on the box patches.
        area_share: ``[n_with_box]`` share of image tokens in the box.
        pointing_hit: ``[n_with_box, n_layers]`` most attended image token in the box.
    """

    question_types: list[str]
    correct: list[bool]
    accuracy: dict[str, float]
    has_box: list[bool]
    mass_in_box: torch.Tensor
    area_share: torch.Tensor
    pointing_hit: torch.Tensor

    def accuracy_table(self) -> str:
        """Markdown table: type, samples, accuracy."""
        lines = ["| question type | samples | accuracy |", "| --- | ---: | ---: |"]
        for kind in QUESTION_TYPES:
            if kind in self.accuracy:
                n = self.question_types.count(kind)
                lines.append(f"| {kind} | {n} | {self.accuracy[kind]:.1%} |")
        total = sum(self.correct) / len(self.correct)
        lines.append(f"| all | {len(self.correct)} | {total:.1%} |")
        return "\n".join(lines)

    def attention_table(self) -> str:
        """Markdown table per layer: mean mass in box, mean area share, ratio, pointing hits."""
        area = self.area_share.mean().item()
        lines = [
            "| layer | attention mass in box | box area share | ratio | pointing-game hits |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for layer in range(self.mass_in_box.shape[1]):
            mass = self.mass_in_box[:, layer].mean().item()
            hits = self.pointing_hit[:, layer].float().mean().item()
            lines.append(f"| {layer} | {mass:.3f} | {area:.3f} | {mass / area:.2f} | {hits:.1%} |")
        return "\n".join(lines)


def evaluate(model: Any, samples: list[ShapesSample], batch_size: int = 48) -> Evaluation:
    """Accuracy and attention-in-box numbers of `model` (an mmlens `HookedLlava`) on `samples`.

    Batches of `batch_size` go through ``model.prepare([images], [questions])`` (left-padded) and
    one ``model.run_with_cache`` each (only the attention patterns are cached).
    """
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    correct, has_box, mass, area, hits = [], [], [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inp = model.prepare([s.image for s in chunk], [s.question for s in chunk])
        with torch.no_grad():
            logits, cache = model.run_with_cache(inp, names_filter=lambda name: name in names)
        is_correct = correct_answers(model, inp, [s.answer for s in chunk], logits[:, -1])
        # [batch, layer, key]: last query row, mean over heads
        rows = torch.stack([cache[name][:, :, -1, :].mean(1) for name in names], dim=1)
        for item, sample in enumerate(chunk):
            correct.append(bool(is_correct[item]))
            has_box.append(bool(sample.boxes))
            if not sample.boxes:
                continue
            grid = inp.layout.patch_grid(item)
            maps = rows[item][:, grid.flatten()].reshape(n_layers, *grid.shape)
            scores = box_scores(model, inp, sample.boxes, maps, image=item)
            mass.append(scores["mass_in_box"])
            area.append(torch.tensor(scores["area_share"]))
            hits.append(scores["pointing_hit"])
    types = [sample.question_type for sample in samples]
    accuracy = {
        kind: sum(c for c, t in zip(correct, types, strict=True) if t == kind) / types.count(kind)
        for kind in QUESTION_TYPES
        if kind in types
    }
    return Evaluation(
        question_types=types,
        correct=correct,
        accuracy=accuracy,
        has_box=has_box,
        mass_in_box=torch.stack(mass) if mass else torch.zeros(0, n_layers),
        area_share=torch.stack(area) if area else torch.zeros(0),
        pointing_hit=torch.stack(hits) if hits else torch.zeros(0, n_layers, dtype=torch.bool),
    )


@dataclass
class BoxScores:
    """Per-layer ground-truth scores of maps over the image, averaged over samples.

    Attributes:
        mass_in_box: ``[n_layers]`` share of a map's mass on the question's box patches.
        pointing_hit: ``[n_layers]`` fraction of samples whose map maximum lies in the boxes.
        area_share: the boxes' mean share of the image patches (what a uniform map gives).
        n_samples: samples averaged.
    """

    mass_in_box: torch.Tensor
    pointing_hit: torch.Tensor
    area_share: float
    n_samples: int

    def table(self) -> str:
        """Markdown table per layer: mass in box, area share, ratio, pointing-game hits."""
        lines = [
            "| layer | mass in box | box area share | ratio | pointing-game hits |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for layer, (mass, hits) in enumerate(zip(self.mass_in_box, self.pointing_hit, strict=True)):
            ratio = float(mass) / self.area_share
            lines.append(
                f"| {layer} | {mass:.3f} | {self.area_share:.3f} | {ratio:.2f} | {hits:.1%} |"
            )
        return "\n".join(lines)


def cam_box_scores(model: Any, samples: list[ShapesSample]) -> BoxScores:
    """LLaVA-CAM (all decoder layers, one backward per sample) of each sample's answer, scored
    against the sample's boxes with `mmlens.report.box_scores`; samples without boxes are skipped.

    Example:
        >>> cam_box_scores(mmlens.load("tiny-shapes"), generate(14, seed=7)).table()  # doctest: +SKIP
    """
    from mmlens.analysis import llava_cam

    layers = range(model.cfg.n_layers)
    mass, hits, area = [], [], []
    for sample in tqdm([s for s in samples if s.boxes], desc="LLaVA-CAM vs boxes"):
        inp = model.prepare(sample.image, sample.question)
        cam = llava_cam(model, inp, sample.answer, layers=layers, progress=False)
        scores = box_scores(model, inp, sample.boxes, cam.maps)
        mass.append(scores["mass_in_box"])
        hits.append(scores["pointing_hit"].float())
        area.append(scores["area_share"])
    if not mass:
        raise ValueError("no sample names an object in its image (every sample has empty boxes)")
    return BoxScores(
        mass_in_box=torch.stack(mass).mean(0),
        pointing_hit=torch.stack(hits).mean(0),
        area_share=sum(area) / len(area),
        n_samples=len(mass),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Accuracy per question type and attention-in-box numbers of a zoo model.",
    )
    parser.add_argument("--model", default="tiny-shapes", help="zoo name or checkpoint folder")
    parser.add_argument("--per-type", type=int, default=200, help="samples per question type")
    parser.add_argument("--seed", type=int, default=7, help="dataset seed (held out)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cam-samples", type=int, default=70, help="samples for LLaVA-CAM (0: skip)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import mmlens
    from mmlens.zoo import MODELS

    if args.model in MODELS:
        model = mmlens.load(args.model)
    else:
        model = mmlens.from_pretrained(args.model)
        model.default_template = TEMPLATE  # a shapes organism trained here
    samples = generate(args.per_type * len(QUESTION_TYPES), seed=args.seed)
    result = evaluate(model, samples)
    print(f"{len(samples)} samples, dataset seed {args.seed}\n")
    print(result.accuracy_table())
    n_box = int(sum(result.has_box))
    print(f"\nattention of the last position over the image, {n_box} samples with boxes\n")
    print(result.attention_table())
    if args.cam_samples:
        cam = cam_box_scores(model, samples[: args.cam_samples])
        print(f"\nLLaVA-CAM of the answer over the image, {cam.n_samples} samples with boxes\n")
        print(cam.table())


if __name__ == "__main__":
    main()
