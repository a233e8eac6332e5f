"""Paper presets: every setting a paper's code fixed, as one object for `prepare` and the analyses.

mmlens' defaults equal Hugging Face's implementation; both papers ran the original LLaVA
code, which differs in image geometry, tiling, tokenisation and prompt (the table in
docs/semantics.md, "Reproducing the papers' settings"). A preset holds what the paper's code did:

    >>> from mmlens.analysis import knockout_sweep
    >>> inp = model.prepare(image, sample.question, preset=CROSS_MODAL_FLOW)
    >>> result = knockout_sweep(model, inp, preset=CROSS_MODAL_FLOW, boxes=[sample.boxes],
    ...                         progress=False)
    >>> result.attrs["preset"], result.attrs["window_size"]   # 9: an unknown model's window
    ('cross_modal_flow', 9)

An analysis given a preset checks that each input was prepared with it, takes its remaining
settings (flows, window, patch rule, logit-lens norm) unless passed explicitly, and records the
preset's name and the inputs' settings in the result's `attrs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any

from mmlens.analysis.sweep import PAPER_FLOWS, PATCH_FLOWS
from mmlens.inputs.adapters import processor_adapter
from mmlens.inputs.templates import CROSS_MODAL_SUFFIX, ORIGINAL_TEMPLATES


@dataclass(frozen=True)
class Preset:
    """The settings of one paper's code.

    Attributes:
        name: short name, recorded in results.
        paper: the paper, in words.
        suffix: the answer-format instruction after the question (outside the `question`
            segment), or None: the data set's own (`mmlens.data.Sample.suffix`, or what
            `prepare` is given).
        image_mode: single-crop image geometry (`mmlens.inputs.geometry.IMAGE_MODES`), for
            models whose processor takes it.
        anyres: tiling rule ("hf" or "llava"), for models whose processor tiles.
        tokenization: `mmlens.inputs.tokenization.TOKENIZATIONS`.
        flows: the knockout flows (name -> (source, target)), as `knockout_sweep` takes them.
        patch_rule: the `patches_in_box` rule for "related_patches" / "other_patches" (for a
            model whose processor gives pixels as rows of flattened patches or crops, where the
            painted-mask rule cannot be read, `patch_rule_for` gives the geometric rule).
        window_sizes: checkpoint name (a part of the model's name, lower case) -> knockout
            window, ahead of the windows the model's family declares for this preset
            (`paper_window_sizes`, `mmlens.models.family`).
        default_window_size: the window of any other model.
        correct_only: whether the paper analysed only samples the model answers correctly.
        subword: which sub-word of the answer is scored ("first", or "final" for appendix-style
            runs; `mmlens.analysis.answer_probability`).
        apply_final_norm: the logit lens' norm (`mmlens.analysis.logit_lens`).

    The template is not a field: each checkpoint family ran with its own original conversation
    (`mmlens.inputs.templates.ORIGINAL_TEMPLATES`; `template`).
    """

    name: str
    paper: str
    suffix: str | None = None
    image_mode: str | None = "pad"
    anyres: str = "llava"
    tokenization: str = "llava"
    flows: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    patch_rule: str = "geometric"
    window_sizes: Mapping[str, int] = field(default_factory=dict)
    default_window_size: int = 9
    correct_only: bool = False
    subword: str = "first"
    apply_final_norm: bool | str = True

    def template(self, model: Any) -> str:
        """The conversation the original code used for `model`'s checkpoint: a release
        format's own (its `prepare_defaults`), else its family's (a model whose default is not
        a released family's, such as a shipped organism, keeps its own)."""
        released = getattr(model, "prepare_defaults", {}).get("template")
        return released or ORIGINAL_TEMPLATES.get(model.default_template, model.default_template)

    def prepare_kwargs(self, model: Any) -> dict[str, Any]:
        """The keyword arguments of `model.prepare` under this preset: template, tokenisation
        (a release format's own where it has one: `model.prepare_defaults`), the suffix if the
        preset fixes one; of `image_mode` and `anyres`, those the model's
        processor takes (`mmlens.inputs.adapters.ProcessorAdapter.options`). A processor with
        one geometry of its own, or one that places its image tokens itself, gets its template,
        the suffix and Hugging Face's tokenisation.

        Examples:
            >>> CROSS_MODAL_FLOW.prepare_kwargs(model)["template"]  # "vicuna_v1" for a Vicuna LLaVA
            'llava_v1'
        """
        # A release format's own tokenisation wins (the v0 form tokenises the whole prompt).
        released = getattr(model, "prepare_defaults", {}).get("tokenization")
        tokenization = released or self.tokenization
        kwargs: dict[str, Any] = dict(template=self.template(model), tokenization=tokenization)
        if self.suffix is not None:
            kwargs["suffix"] = self.suffix
        adapter = processor_adapter(model.processor)
        if adapter.places_image_tokens or not adapter.options:
            kwargs["tokenization"] = "hf"
        for option in adapter.options:
            kwargs[option] = getattr(self, option)
        return kwargs

    def patch_rule_for(self, model: Any) -> tuple[str, str | None]:
        """The `patches_in_box` rule of the patch flows for `model` and, where it is not
        `patch_rule`, why: the painted-mask rule reads the processor's output as images; a
        processor that gives pixels as rows of flattened patches or of crops (its adapter's
        `pixel_rows`) gets the geometric rule, which the paper's code never ran for such a
        model either.

        Examples:
            >>> CROSS_MODAL_FLOW.patch_rule_for(model)   # LLaVA: the paper's rule
            ('mask', None)
        """
        rows = processor_adapter(model.processor).pixel_rows is not None
        if self.patch_rule == "mask" and rows:
            return "geometric", (
                "the painted-mask patch rule reads pixels as images; this model's processor "
                "gives rows of flattened patches or of crops, so the related patches are those any pixel "
                "of the box lands in (rule 'geometric')"
            )
        return self.patch_rule, None

    def window_size(self, model: Any) -> int:
        """The knockout window for `model`: by its checkpoint name (`window_sizes`, then its
        family's `paper_window_sizes` for this preset), else `default_window_size`.

        Examples:
            >>> CROSS_MODAL_FLOW.window_size(model)  # the paper's 7 or 9 for its checkpoints
            9
        """
        name = PurePath(str(model.cfg.model_name)).name.lower()
        declared = model.paper_window_sizes.get(self.name, {})
        for checkpoint, size in {**declared, **self.window_sizes}.items():
            if checkpoint in name:
                return size
        return self.default_window_size

    def check_input(self, model: Any, inp: Any) -> None:
        """Raise if `inp` was not prepared with this preset for `model` (naming each setting
        that differs and the fix)."""
        expected = self.prepare_kwargs(model)
        actual = {name: inp.settings[name] for name in expected}
        differ = [
            f"{name}={actual[name]!r} (the preset's: {value!r})"
            for name, value in expected.items()
            if actual[name] != value
        ]
        if differ:
            raise ValueError(
                f"this input was not prepared with preset {self.name!r}: {', '.join(differ)}; "
                f"prepare it with model.prepare(..., preset={self.name.upper()}) or run the "
                "analysis without the preset"
            )


CROSS_MODAL_FLOW = Preset(
    name="cross_modal_flow",
    paper="Cross-modal Information Flow in Multimodal Large Language Models",
    suffix=CROSS_MODAL_SUFFIX,
    flows={**PAPER_FLOWS, **PATCH_FLOWS},
    patch_rule="mask",
    # Its plotted windows per checkpoint are declared by the families (`paper_window_sizes`).
    default_window_size=9,
    correct_only=True,
    subword="first",
    apply_final_norm="last_layer",
)
"""The Cross-modal Information Flow code: original LLaVA pipelines (pad-to-square, original
anyres, `tokenizer_image_token`, each family's original conversation), the answer-format
suffix, Figures 3-5's flows with the painted-mask patch rule, its plotted windows, correctly
answered samples only, first sub-word, the logit lens on HF's `hidden_states`."""

REDUNDANCY_TO_RELEVANCE = Preset(
    name="redundancy_to_relevance",
    paper="From Redundancy to Relevance: Enhancing Explainability in Multimodal Large Language "
    "Models",
)
"""The From-Redundancy code: LLaVA's own evaluation pipeline (pad-to-square, original anyres,
`tokenizer_image_token`, each family's original conversation, greedy answers); the answer
instruction is each benchmark's own (the data sets add it)."""

REDUNDANCY_TO_RELEVANCE_CAM = replace(
    REDUNDANCY_TO_RELEVANCE, name="redundancy_to_relevance_cam", image_mode="squash"
)
"""`REDUNDANCY_TO_RELEVANCE` as its LLaVA-CAM demo feeds images: squashed to the square input."""

PRESETS = {
    preset.name: preset
    for preset in (CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE, REDUNDANCY_TO_RELEVANCE_CAM)
}
"""Every preset by name (as results record it)."""
