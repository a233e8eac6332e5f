"""HookedTransformer: a decoder-only language model (Llama / Vicuna / Mistral / Llama-3) with
TransformerLens hook points, built on `transformer_lens.HookedRootModule`.

Read top to bottom: embed -> blocks (RMSNorm, rotary GQA attention, gated MLP) -> final norm
-> unembed. Multimodal subclasses only override `embed_input`. The hook bookkeeping lives in
`mmlens.models.hooking`, the prefix and suffix runs in `mmlens.models.prefix`.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from tqdm.auto import tqdm
from transformer_lens import FactoredMatrix

from mmlens.components import (
    Attention,
    Embed,
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    TransformerBlock,
    Unembed,
)
from mmlens.config import MMConfig
from mmlens.hooks import HookPoint
from mmlens.inputs import MultimodalInput, processor_fingerprint
from mmlens.loading import load_weights, quiet_release_noise, read_checkpoint
from mmlens.models.hooking import HookBookkeeping
from mmlens.models.placement import place
from mmlens.models.prefix import PrefixRuns, _Rows
from mmlens.models.registry import model_class_for, register
from mmlens.sequence import (
    KVCache,
    LayerKV,
    causal_padding_mask,
    rotary_position_ids,
    suffix_mask,
    survivor_index,
)


def _stacked_weight(module: str, name: str, shape: str, note: str = "") -> property:
    """A model-level weight: `blocks[l].{module}.{name}` stacked over layers (TransformerLens'
    `model.W_Q` and the like), on the embedding's device."""

    def stacked(self: HookedTransformer) -> torch.Tensor:
        device = self.W_E.device
        return torch.stack([getattr(getattr(b, module), name).to(device) for b in self.blocks])

    return property(stacked, doc=f"`{shape}`{': ' + note if note else ''}.")


@register("llama", "mistral", "qwen2")
class HookedTransformer(PrefixRuns, HookBookkeeping):
    """Decoder-only LM with TransformerLens hook names (docs/hooks.md).

    Examples:
        ``mmlens.HookedTransformer.from_pretrained(folder)`` loads a Llama or Mistral checkpoint;
        every multimodal model is a HookedTransformer too, and takes text alone:

        >>> logits, cache = model.run_with_cache("Is the star red?")
        >>> cache["blocks.0.attn.hook_pattern"].shape  # [batch, head, q_pos, k_pos]
        torch.Size([1, 4, 6, 6])
    """

    def __init__(self, cfg: MMConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg.d_vocab, cfg.d_model, cfg.embed_scale)
        self.hook_token_embed = HookPoint()  # [batch, pos, d_model]: the lookup of every id
        self.hook_embed = HookPoint()  # [batch, pos, d_model]: what enters the first block
        self.rotary = RotaryEmbedding(cfg.d_head, cfg.rope_parameters, cfg.max_position_embeddings)
        if cfg.layer_rope_parameters is not None:  # one table per layer type (Gemma 3)
            self.layer_rotary = nn.ModuleDict(
                {
                    kind: RotaryEmbedding(cfg.d_head, params, cfg.max_position_embeddings)
                    for kind, params in cfg.layer_rope_parameters.items()
                }
            )

        def norm() -> RMSNorm:
            return RMSNorm(cfg.d_model, cfg.eps, cfg.norm_unit_offset)

        self.blocks = nn.ModuleList(
            TransformerBlock(
                norm(),
                Attention(
                    cfg.d_model,
                    cfg.n_heads,
                    cfg.n_key_value_heads,
                    cfg.d_head,
                    bias=cfg.attention_bias or cfg.qkv_bias,
                    rotary=True,
                    output_bias=cfg.attention_bias,
                    qk_norm_eps=cfg.eps if cfg.qk_norm else None,
                    scale=cfg.attn_scale,
                    qk_norm_unit_offset=cfg.norm_unit_offset,
                ),
                norm(),
                GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.mlp_bias),
                position_hooks=True,
                ln1_post=norm() if cfg.sandwich_norms else None,
                ln2_post=norm() if cfg.sandwich_norms else None,
            )
            for _ in range(cfg.n_layers)
        )
        self.ln_final = norm()
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.device_map: dict[str, str] | None = None  # set by `models.placement.place`
        self.setup()

    # ------------------------------------------------------------------ loading
    weight_prefixes: tuple[tuple[str, str], ...] = ()
    """A family's own checkpoint-prefix rules, tried before the shared ones
    (`mmlens.loading.mmlens_key`)."""
    weight_renames: tuple[tuple[str, str], ...] = ()
    """A family's own tensor renames, tried before the shared ones."""

    @classmethod
    def config_from_hf(cls, hf_config: Any, **overrides: Any) -> MMConfig:
        """This class's `MMConfig` for a HF config (a decoder's: `MMConfig.from_hf`)."""
        return MMConfig.from_hf(hf_config, **overrides)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        device_map: str | dict[str, Any] | None = None,
    ) -> HookedTransformer:
        """Load a Hugging Face checkpoint folder (or a hub id already in the local cache) as
        the class registered for its `config.model_type`, which must be `cls` or a subclass:
        `HookedTransformer.from_pretrained` (and `mmlens.from_pretrained`) load any supported
        checkpoint.

        Weights are converted tensor by tensor from safetensors; the HF model is never built
        and no code from the folder runs (docs/checkpoints.md). `device_map` ("auto" or a dict
        module name -> device, `mmlens.models.placement`) spreads a model too large for one
        device over several: the weights are read to the CPU, then each module moves to its
        device (`device` is then unused).

        Examples:
            >>> llava = mmlens.HookedLlava.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
            >>> type(llava).__name__, llava.cfg.n_layers
            ('HookedLlava', 6)
            >>> mmlens.HookedLlavaNext.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
            Traceback (most recent call last):
            TypeError: ...tiny-shapes holds a 'llava' checkpoint, which loads as HookedLlava, not HookedLlavaNext; use mmlens.from_pretrained to dispatch

            A hub id is read from the local cache (``"llava-hf/llava-1.5-7b-hf"``);
            ``device_map="auto"`` spreads a large model over the visible GPUs.
        """
        with quiet_release_noise():  # transformers' notes on configs mmlens reads its own way
            folder, hf_config = read_checkpoint(path_or_id)
            model_cls = model_class_for(hf_config.model_type)
            if not issubclass(model_cls, cls):
                raise TypeError(
                    f"{folder} holds a {hf_config.model_type!r} checkpoint, which loads as "
                    f"{model_cls.__name__}, not {cls.__name__}; use mmlens.from_pretrained to "
                    "dispatch"
                )
            model = load_weights(
                model_cls,
                folder,
                hf_config,
                dtype=dtype,
                device="cpu" if device_map is not None else device,
                model_name=str(path_or_id),
            )
        if device_map is not None:
            place(model, device_map)
        return model

    # ------------------------------------------------------------------ TL-style weights
    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[torch.Tensor, "d_vocab"]:
        return torch.zeros(self.cfg.d_vocab, dtype=self.W_U.dtype, device=self.W_U.device)

    W_Q = _stacked_weight("attn", "W_Q", "[layer, head, d_model, d_head]")
    W_K = _stacked_weight("attn", "W_K", "[layer, head, d_model, d_head]", "kv heads repeated")
    W_V = _stacked_weight("attn", "W_V", "[layer, head, d_model, d_head]", "kv heads repeated")
    W_O = _stacked_weight("attn", "W_O", "[layer, head, d_head, d_model]")
    _W_K = _stacked_weight("attn", "_W_K", "[layer, kv_head, d_model, d_head]")
    _W_V = _stacked_weight("attn", "_W_V", "[layer, kv_head, d_model, d_head]")
    b_Q = _stacked_weight("attn", "b_Q", "[layer, head, d_head]")
    b_K = _stacked_weight("attn", "b_K", "[layer, head, d_head]")
    b_V = _stacked_weight("attn", "b_V", "[layer, head, d_head]")
    b_O = _stacked_weight("attn", "b_O", "[layer, d_model]")
    W_in = _stacked_weight("mlp", "W_in", "[layer, d_model, d_mlp]")
    W_gate = _stacked_weight("mlp", "W_gate", "[layer, d_model, d_mlp]")
    W_out = _stacked_weight("mlp", "W_out", "[layer, d_mlp, d_model]")
    b_in = _stacked_weight("mlp", "b_in", "[layer, d_mlp]")
    b_out = _stacked_weight("mlp", "b_out", "[layer, d_model]")

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's QK circuit, `[layer, head, d_model, d_model]` factored (TransformerLens'
        `model.QK`).

        Examples:
            >>> model.QK.shape
            torch.Size([6, 4, 128, 128])
            >>> layer, head = 2, 1
            >>> explicit = model.W_Q[layer, head] @ model.W_K[layer, head].T
            >>> torch.allclose(model.QK[layer, head].AB, explicit)
            True
        """
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's OV circuit, `[layer, head, d_model, d_model]` factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output `blocks.{l}.attn.hook_result` (`[batch, pos, head,
        d_model]`); the attention output is then their sum plus `b_O` (TransformerLens'
        `use_attn_result`). Off by default: it costs a `d_model` vector per head and position.

        Examples:
            >>> model.set_use_attn_result(True)
            >>> _, cache = model.run_with_cache(inp, names_filter=lambda n: "attn" in n)
            >>> result = cache["blocks.0.attn.hook_result"]           # [batch, pos, head, d_model]
            >>> torch.allclose(result.sum(2), cache["blocks.0.hook_attn_out"], atol=1e-5)
            True
            >>> model.set_use_attn_result(False)
        """
        self.cfg.use_attn_result = use_attn_result
        for module in self.modules():  # the decoder's and the vision tower's attention
            if isinstance(module, Attention):
                module.use_attn_result = use_attn_result

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[torch.Tensor, "..."]
    ) -> Float[torch.Tensor, "... d_model"]:
        """Unembedding directions of `tokens` with the final norm's weight folded in.

        TransformerLens folds norm weights into `W_U`; mmlens keeps the checkpoint's weights, so
        the fold happens here. Then `cache.logit_attrs` (which divides by the cached final-norm
        scale) reproduces the logits exactly.
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, tokens].movedim(0, -1) * self.ln_final.gain

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[torch.Tensor, "d_model"]:
        """Sum of the output biases written to the residual stream before `layer` (zero for
        Llama-style checkpoints, which have none)."""
        total = torch.zeros(self.cfg.d_model, dtype=self.W_U.dtype, device=self.W_U.device)
        for index, block in enumerate(self.blocks[: layer + (1 if mlp_input else 0)]):
            total = total + block.attn.b_O
            down_bias = block.mlp.down_proj.bias
            if include_mlp_biases and down_bias is not None and index < layer:
                total = total + down_bias
        return total

    # ------------------------------------------------------------------ tokenizer helpers
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer; pass token ids, or load it with from_pretrained"
            )
        return self.tokenizer

    def to_tokens(
        self, text: str | list[str], prepend_bos: bool = True
    ) -> Int[torch.Tensor, "batch pos"]:
        """Token ids `[batch, pos]` (left-padded) for a string or a list of strings."""
        return self._tokenize(text, prepend_bos)["input_ids"]

    def _tokenize(self, text: str | list[str], prepend_bos: bool = True) -> dict[str, torch.Tensor]:
        tokenizer = self._require_tokenizer()
        encoded = tokenizer(
            [text] if isinstance(text, str) else list(text),
            return_tensors="pt",
            padding=True,
            add_special_tokens=prepend_bos,
        )
        return {
            k: v.to(self.W_E.device)
            for k, v in encoded.items()
            if k in ("input_ids", "attention_mask")
        }

    def to_string(self, tokens: int | Int[torch.Tensor, "..."] | list[int]) -> str | list[str]:
        """Decode ids: one string for a 0-/1-D input, a list of strings for `[batch, pos]`."""
        tokenizer = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return tokenizer.batch_decode(tokens.tolist())
        return tokenizer.decode(tokens.reshape(-1).tolist())

    def to_single_token(self, string: str) -> int:
        """The id of `string`, which must be exactly one token (no BOS)."""
        ids = self._require_tokenizer()(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens ({ids}), not a single token")
        return ids[0]

    def to_str_tokens(
        self, tokens: str | Int[torch.Tensor, "pos"] | MultimodalInput
    ) -> list[str] | list[list[str]]:
        """Each token as a string: of a text (tokenized with BOS), of ids, or of a prepared
        input (`model.prepare`; image tokens included, padding left out): a list for one item,
        a list per item for a batch.

        Examples:
            >>> inp = model.prepare(image, "Is the star blue or red?")
            >>> model.to_str_tokens(inp)[-4:]
            ['red', '?', 'ASSISTANT', ':']
        """
        if isinstance(tokens, MultimodalInput):
            items = [tokens.item(index).input_ids[0] for index in range(tokens.batch_size)]
            strings = [self.to_str_tokens(ids) for ids in items]
            return strings[0] if len(strings) == 1 else strings
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens)[0]
        return self._require_tokenizer().convert_ids_to_tokens(
            torch.as_tensor(tokens).reshape(-1).tolist()
        )

    # ------------------------------------------------------------------ forward
    image_inputs: tuple[str, ...] = ()
    """HF-style keyword tensors for images that `forward` takes besides ids and mask."""

    def model_inputs(self, input: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Normalise any accepted input to HF-style keyword tensors.

        Accepts a string or list of strings (tokenized here), a `[batch, pos]` tensor of ids,
        an object with `model_kwargs()` (a `MultimodalInput`, which must come from this model's
        processor), or HF-style keywords (`input_ids`, `attention_mask`, `image_inputs`).
        Unknown keywords are a ValueError (a misspelt `attention_mask` would run without a
        mask).
        """
        accepted = ("input_ids", "attention_mask", *self.image_inputs)
        unknown = [name for name in kwargs if name not in accepted]
        if unknown:
            close = difflib.get_close_matches(unknown[0], accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if not self.image_inputs and {"pixel_values", "image_sizes"} & set(unknown):
                hint = "; a text-only model takes no images: use a multimodal model"
            raise ValueError(
                f"{type(self).__name__} got unknown keyword argument(s) {unknown}{hint} "
                f"It takes {', '.join(accepted)} (or a MultimodalInput from model.prepare)"
            )
        if isinstance(input, (str, list)):
            inputs = self._tokenize(input)
        elif isinstance(input, torch.Tensor):
            inputs = {"input_ids": input if input.ndim == 2 else input[None]}
        elif input is not None and hasattr(input, "model_kwargs"):
            self.check_prepared_here(input)
            inputs = dict(input.model_kwargs())
        elif input is None:
            inputs = {}
        else:
            raise TypeError(f"cannot run on an input of type {type(input).__name__}")
        inputs.update({k: v for k, v in kwargs.items() if v is not None})
        if "input_ids" not in inputs:
            raise ValueError("no input: pass text, token ids, a MultimodalInput or input_ids=...")
        ids = inputs["input_ids"]
        placeholder = self.cfg.image_token_id  # may follow the vocabulary (original releases)
        checked = ids if placeholder is None else ids[ids != placeholder]
        largest = int(checked.max()) if checked.numel() else 0
        if largest >= self.cfg.d_vocab:
            raise ValueError(
                f"token id {largest} is outside this model's vocabulary of {self.cfg.d_vocab}; "
                "were the ids made with another model's tokenizer?"
            )
        return inputs

    def check_prepared_here(self, inp: Any) -> None:
        """Raise if `inp` (a `MultimodalInput`) was prepared for a different model: another
        tokenizer, image processor or image token would make its ids and layout mean other
        things here."""
        image_token_id = self.cfg.image_token_id
        if image_token_id is not None and inp.image_token_id != image_token_id:
            raise ValueError(
                f"this input's image token id is {inp.image_token_id}, this model's "
                f"{image_token_id}: it was prepared for another model. Prepare it with this "
                "model: model.prepare(image, prompt)"
            )
        processor = getattr(self, "processor", None)
        made_by = getattr(inp, "processor_fingerprint", None)
        if processor is not None and made_by is not None:
            if made_by != processor_fingerprint(processor):
                raise ValueError(
                    "this input was prepared with a different processor (tokenizer or image "
                    "processor settings) than this model's, so its token ids and image layout "
                    "would mean other things here. Prepare it with this model: "
                    "model.prepare(image, prompt)"
                )

    def embed_input(
        self, input_ids: Int[torch.Tensor, "batch pos"], **multimodal: Any
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Residual stream before the first block; multimodal subclasses merge images here."""
        if multimodal:
            raise ValueError(
                f"{type(self).__name__} takes no {sorted(multimodal)}; use a multimodal model"
            )
        return self.hook_embed(self.hook_token_embed(self.embed(input_ids)))

    def position_ids(
        self, attention_mask: Int[torch.Tensor, "batch pos"], **inputs: Any
    ) -> Int[torch.Tensor, "... batch pos"]:
        """Rotary position ids of the positions of `attention_mask`: counted from each item's
        first real token (as HF `generate` does), so a left-padded item gives the same logits
        as the item alone.

        Every pass takes its rotary ids from here (`forward`, `generate`'s steps, `run_prefix`);
        the decoder reads nothing of their shape but that the last axis is the sequence: it
        slices, gathers and joins along that axis only, so leading axes pass through. This is
        where a family whose ids have several axes (3-D M-RoPE) computes them.

        Args:
            attention_mask: ``[batch, pos]`` of every position so far (in a generation step,
                the cached positions', then the new ones').
            inputs: this pass's `input_ids` and image inputs (a generation step after the
                prompt passes its new ids alone); unused here.

        Examples:
            >>> model.position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
            tensor([[0, 0, 0, 1, 2],
                    [0, 1, 2, 3, 4]])

        Raises:
            ValueError: a position at or past `cfg.rotary_limit`.
        """
        position_ids = rotary_position_ids(attention_mask)
        limit = self.cfg.rotary_limit
        if limit is not None and position_ids.numel() and int(position_ids.max()) >= limit:
            raise ValueError(
                f"the sequence reaches position {int(position_ids.max())}; from {limit} on "
                f"{self.cfg.rotary_limit_reason or 'the rotary embedding changes'}, which mmlens "
                "does not implement: use a shorter prompt, fewer image tokens or fewer new tokens"
            )
        return position_ids

    def attention_groups(
        self, input_ids: Int[torch.Tensor, "batch pos"] | None = None, **inputs: Any
    ) -> Int[torch.Tensor, "batch pos"] | None:
        """Bidirectional attention groups of this pass's new positions: ``[batch, pos]``, the
        group of each position (-1: none), or None (a causal decoder: the default). Positions
        of one group see each other whatever their order (Gemma 3's image tokens); masks,
        prefix and suffix runs, pruning and knockout read them through original positions.

        Examples:
            >>> model.attention_groups(torch.tensor([[1, 2, 3]])) is None
            True
        """
        return None

    def forward(
        self,
        input: Any = None,
        *,
        input_ids: Int[torch.Tensor, "batch pos"] | None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        stop_at_layer: int | None = None,
        past_kv_cache: KVCache | None = None,
        **multimodal: Any,
    ) -> (
        Float[torch.Tensor, "batch pos d_vocab"]
        | Float[torch.Tensor, ""]
        | tuple[Float[torch.Tensor, "batch pos d_vocab"], Float[torch.Tensor, ""]]
        | Float[torch.Tensor, "batch pos d_model"]
        | None
    ):
        """Run the model.

        Args:
            input: text, ids `[batch, pos]`, or a `MultimodalInput`; or pass HF-style keywords
                (`input_ids`, `attention_mask`, and for multimodal models `pixel_values`,
                `image_sizes`).
            return_type: "logits" (`[batch, pos, d_vocab]`), "loss" (mean next-token loss over
                real positions), "both" (`(logits, loss)`) or None.
            stop_at_layer: return the residual stream before this block (`[batch, pos, d_model]`).
            past_kv_cache: keys/values of earlier positions; extended in place (generation).
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type={return_type!r}: use 'logits', 'loss', 'both' or None")
        if stop_at_layer is not None:
            stop_at_layer = self._stop_layer(stop_at_layer)
        inputs = self.model_inputs(
            input, input_ids=input_ids, attention_mask=attention_mask, **multimodal
        )
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Image features are only needed where image tokens are new (not for cached steps).
        image_inputs = {k: v for k, v in inputs.items() if v is not None}
        resid = self.embed_input(input_ids, **image_inputs)

        resid, positions = self._run_decoder(
            resid,
            attention_mask,
            past_kv_cache,
            stop_at_layer,
            inputs={"input_ids": input_ids, **image_inputs},
        )
        if stop_at_layer is not None:
            return resid

        if return_type is None:
            return None
        logits = self.to_logits(resid)
        if return_type == "logits":
            return logits
        if positions.shape[1] != input_ids.shape[1]:
            raise ValueError("return_type='loss' is undefined when tokens were pruned")
        loss = self.next_token_loss(logits, input_ids, attention_mask)
        return loss if return_type == "loss" else (logits, loss)

    def _stop_layer(self, stop_at_layer: Any) -> int:
        """`stop_at_layer` as a block count in 0..n_layers (negative counts from the end, as in
        TransformerLens); anything else is a ValueError naming the range."""
        n = self.cfg.n_layers
        if (
            isinstance(stop_at_layer, bool)
            or not isinstance(stop_at_layer, int)
            or not -n <= stop_at_layer <= n
        ):
            raise ValueError(
                f"stop_at_layer={stop_at_layer!r} is outside -{n}..{n}: the model has {n} blocks "
                f"(0 stops before the first, {n} after the last, negative counts from the end)"
            )
        return stop_at_layer + n if stop_at_layer < 0 else stop_at_layer

    def _run_decoder(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        cache: KVCache | None = None,
        stop_at_layer: int | None = None,
        record: list | None = None,
        last_only: bool = False,
        inputs: dict[str, Any] | None = None,
    ) -> tuple[Float[torch.Tensor, "batch kept_pos d_model"], Int[torch.Tensor, "batch kept_pos"]]:
        """The decoder blocks; returns the residual stream and its original positions.

        Tracks the original position of every token so that a `hook_prune` hook can remove
        tokens mid-model: from that block on the residual stream, keys and values (and the KV
        cache) really shrink, and the survivors keep their rotary positions. `cache` holds the
        keys and values of earlier positions and is extended in place; `record` receives each
        layer's entering residual stream and its positions (`run_prefix`). `last_only`: the
        final block computes the last position's output only (every position's keys). `inputs`
        (this pass's ids and image inputs) go to `position_ids`.
        """
        batch, n_new = attention_mask.shape
        seen = cache.attention_mask if cache is not None else attention_mask[:, :0]
        all_seen = torch.cat((seen, attention_mask), dim=1)
        if cache is not None:
            cache.attention_mask = all_seen
        n_seen = seen.shape[1]
        rows = _Rows(
            resid,
            torch.arange(n_seen, n_seen + n_new, device=resid.device).expand(batch, -1),
            attention_mask.bool(),
            self.position_ids(all_seen, **(inputs or {}))[..., n_seen:],
        )
        groups = self.attention_groups(**(inputs or {}))
        if groups is not None and bool((groups >= 0).any()):
            # Over original positions: seen ones (a cache's) belong to no group here.
            rows.groups = torch.cat((torch.full_like(seen, -1), groups.to(seen.device)), dim=1)
        window = self.cfg.sliding_window
        # Plain causal attention (SDPA's causal kernel) is exact while nothing is cached,
        # padded or pruned, no bidirectional group exists and the sliding window does not bite.
        rows.plain_causal = (
            bool(rows.is_real.all())
            and rows.groups is None
            and (window is None or n_seen + n_new <= window)
        )
        n_blocks = self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        for layer in range(n_blocks):
            if record is not None:
                record.append((rows.resid, rows.positions))
            past = cache.layers[layer] if cache is not None else None
            new = self._run_block(layer, rows, past, last_only and layer == self.cfg.n_layers - 1)
            if cache is not None:
                cache.layers[layer] = new if past is None else past.extended(new)
        return rows.resid, rows.positions

    def _run_block(
        self, layer: int, rows: _Rows, past: LayerKV | None, last_rows: bool = False
    ) -> LayerKV:
        """Block `layer` on `rows` (updated in place), attending to `past` too; returns the
        block's new keys and values. Publishes the block's `SequenceState` to its hooks.

        `last_rows` (the final block, when only the last position's output is read): every row
        gives keys and values, only the last row (of each variant) goes on past the attention.
        """
        block = self.blocks[layer]
        if self.device_map is not None:  # blocks on several devices: rows follow the block
            rows.move_to(next(block.parameters()).device)
        block.publish(rows.state(layer, past))
        kept = block.hook_prune(rows.positions)
        if kept is not rows.positions:
            rows.keep(survivor_index(rows.positions, kept, layer, rows.variant is not None))
        query_index = rows.last_rows() if last_rows else None
        state = rows.state(layer, past, query_index)
        block.publish(state, rows.state(layer, past) if query_index is not None else None)
        block.hook_positions(state.query_positions)
        block.hook_key_positions(state.key_positions)
        window = self.cfg.layer_window(layer)
        if rows.variant is not None:
            mask = rows.memo(
                f"mask{window}",
                (state.key_positions, state.query_positions),
                lambda: suffix_mask(
                    state.query_positions,
                    state.variant,
                    state.key_positions,
                    rows.key_variant(past),
                    state.key_is_real,
                    rows.variant_start,
                    window,
                    rows.groups,
                ),
            )
        elif rows.plain_causal and past is None and query_index is None:
            mask = None  # index-causal attention is exact (survivors keep their order)
        else:
            mask = rows.memo(
                f"mask{window}",
                (state.key_positions, state.query_positions),
                lambda: causal_padding_mask(
                    state.query_positions,
                    state.key_positions,
                    state.key_is_real,
                    window,
                    rows.groups,
                ),
            )
        kind, rotary_module = self.layer_rotary_of(layer)
        rotary = rows.memo(
            f"rotary{kind}",
            (rows.rotary_ids,),
            lambda: rotary_module(rows.rotary_ids, rows.resid.dtype),
        )
        key_rows = (rows.positions, rows.is_real)  # every row gives keys, also with query_index
        rows.resid, (keys, values) = block(
            rows.resid,
            query_index=query_index,
            rotary=rotary,
            mask=mask,
            is_causal=True,
            past_key_value=None if past is None else (past.keys, past.values),
        )
        if query_index is not None:
            rows.keep(query_index, resid=False)
        return LayerKV(keys, values, *key_rows)

    def layer_rotary_of(self, layer: int) -> tuple[str, RotaryEmbedding]:
        """Layer `layer`'s layer type ("" where all layers share one) and rotary table."""
        if not hasattr(self, "layer_rotary"):
            return "", self.rotary
        kind = self.cfg.layer_types[layer]
        return kind, self.layer_rotary[kind]

    def to_logits(
        self, resid: Float[torch.Tensor, "... d_model"], final_norm: bool = True
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits of residual-stream vectors: the final norm (unless `final_norm=False`), then
        the unembedding. The logit lens reads every layer this way.

        Examples:
            >>> _, cache = model.run_with_cache(inp, names_filter="blocks.3.hook_resid_post")
            >>> model.to_string(model.to_logits(cache["blocks.3.hook_resid_post"][0, -1]).argmax())
            'red'
        """
        if self.device_map is not None:
            resid = resid.to(next(self.unembed.parameters()).device)
        return self.unembed(self.ln_final(resid) if final_norm else resid)

    @staticmethod
    def next_token_loss(
        logits: Float[torch.Tensor, "batch pos d_vocab"],
        input_ids: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
    ) -> Float[torch.Tensor, ""]:
        """Mean cross-entropy of predicting each real token from the one before it."""
        per_token = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none"
        )
        weights = (attention_mask[:, 1:] * attention_mask[:, :-1]).flatten().float()
        return (per_token * weights).sum() / weights.sum()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input: Any = None,
        *,
        max_new_tokens: int = 10,
        do_sample: bool = False,
        temperature: float = 1.0,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> Int[torch.Tensor, "batch prompt_and_new_pos"]:
        """Greedy (default) or sampled generation with a KV cache; hooks apply at every step.

        Returns the prompt ids followed by the new ids, like HF `generate`. Items that have
        finished (emitted EOS) are continued with the pad token.

        Examples:
            >>> tokens = model.generate(inp, max_new_tokens=8)
            >>> model.to_string(tokens[0, inp.input_ids.shape[1]:])
            'red </s>'
        """
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(
                f"temperature must be a finite number > 0, got {temperature!r} (for greedy "
                "decoding leave do_sample=False)"
            )
        inputs = self.model_inputs(input, **kwargs)
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", torch.ones_like(input_ids))
        eos = self.cfg.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = torch.as_tensor([] if eos is None else eos, device=input_ids.device).reshape(-1)
        pad_id = (
            self.cfg.pad_token_id
            if self.cfg.pad_token_id is not None
            else int(eos_ids[0])
            if len(eos_ids)
            else 0
        )

        cache = KVCache.empty(self.cfg.n_layers, input_ids.shape[0], input_ids.device)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = [input_ids]
        step_ids, step_mask = input_ids, attention_mask
        for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            logits = self.forward(
                input_ids=step_ids, attention_mask=step_mask, past_kv_cache=cache, **inputs
            )
            inputs = {}  # images are encoded once, in the prefill step
            # The logits come out on the unembedding's device, which a device map may put
            # elsewhere than the ids (docs/checkpoints.md, "Several devices").
            next_logits = logits[:, -1].float().to(input_ids.device)
            if do_sample:
                next_ids = torch.multinomial(F.softmax(next_logits / temperature, dim=-1), 1)[:, 0]
            else:
                next_ids = next_logits.argmax(-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
            generated.append(next_ids[:, None])
            if stop_at_eos:
                finished |= torch.isin(next_ids, eos_ids)
                if bool(finished.all()):
                    break
            step_ids, step_mask = next_ids[:, None], torch.ones_like(next_ids[:, None])
        return torch.cat(generated, dim=1)
