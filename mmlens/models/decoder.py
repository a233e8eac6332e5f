"""HookedTransformer: a decoder-only language model (Llama / Vicuna / Mistral / Llama-3) with
TransformerLens hook points, built on `transformer_lens.HookedRootModule`.

Read top to bottom: embed -> blocks (RMSNorm, rotary GQA attention, gated MLP) -> final norm
-> unembed. Multimodal subclasses only override `embed_input`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint

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
from mmlens.hooks import checked_hook, next_hook_id, remove_hooks
from mmlens.loading import load_weights, read_checkpoint
from mmlens.models.placement import place
from mmlens.models.registry import model_class_for, register
from mmlens.perf import enable_for_cpu_caching
from mmlens.sequence import (
    KVCache,
    LayerKV,
    PrefixState,
    SequenceState,
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
class HookedTransformer(HookedRootModule):
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
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_token_embed = HookPoint()  # [batch, pos, d_model]: the lookup of every id
        self.hook_embed = HookPoint()  # [batch, pos, d_model]: what enters the first block
        self.rotary = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                RMSNorm(cfg.d_model, cfg.eps),
                Attention(
                    cfg.d_model,
                    cfg.n_heads,
                    cfg.n_key_value_heads,
                    cfg.d_head,
                    bias=cfg.attention_bias or cfg.qkv_bias,
                    rotary=True,
                    output_bias=cfg.attention_bias,
                ),
                RMSNorm(cfg.d_model, cfg.eps),
                GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.mlp_bias),
                position_hooks=True,
            )
            for _ in range(cfg.n_layers)
        )
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
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
        folder, hf_config = read_checkpoint(path_or_id)
        model_cls = model_class_for(hf_config.model_type)
        if not issubclass(model_cls, cls):
            raise TypeError(
                f"{folder} holds a {hf_config.model_type!r} checkpoint, which loads as "
                f"{model_cls.__name__}, not {cls.__name__}; use mmlens.from_pretrained to dispatch"
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
        return self.W_U[:, tokens].movedim(0, -1) * self.ln_final.weight

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

    def to_str_tokens(self, tokens: str | Int[torch.Tensor, "pos"]) -> list[str]:
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens)[0]
        return self._require_tokenizer().convert_ids_to_tokens(
            torch.as_tensor(tokens).reshape(-1).tolist()
        )

    # ------------------------------------------------------------------ hooks
    # Every hook mmlens adds goes through these methods: names are checked (with suggestions),
    # user hooks' return values are checked (`mmlens.hooks.check_result`), and temporary hooks
    # are removed whatever interrupts the call (`mmlens.hooks`, docs/hooks.md).
    def _enable_hook_with_name(self, name: str, hook: Any, dir: Literal["fwd", "bwd"]) -> None:
        self._check_hook_name(name)
        super()._enable_hook_with_name(name, checked_hook(hook), dir)

    def _enable_hooks_for_points(
        self, hook_points: Any, enabled: Callable, hook: Callable, dir: Literal["fwd", "bwd"]
    ) -> None:
        super()._enable_hooks_for_points(hook_points, enabled, checked_hook(hook), dir)

    def add_hook(
        self,
        name: str | Callable[[str], bool],
        hook: Callable,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Add a hook that stays until `reset_hooks()` (TransformerLens' `add_hook`).

        Examples:
            >>> model.add_hook("blocks.0.hook_resid_post", lambda resid, hook: resid * 2)
            >>> torch.equal(model(inp), model(inp)), len(model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks)
            (True, 1)
            >>> model.reset_hooks()
        """
        if isinstance(name, str):
            self._check_hook_name(name)
        super().add_hook(name, checked_hook(hook), dir, is_permanent, level, prepend)

    def _check_hook_name(self, name: str) -> None:
        if not isinstance(self.mod_dict.get(name), HookPoint):
            raise ValueError(self._unknown_hook_message(name))
        if (
            name.endswith("attn.hook_result")
            and not self.mod_dict[name.rsplit(".", 1)[0]].use_attn_result
        ):
            raise ValueError(
                f"{name} only runs with per-head results on: call "
                "model.set_use_attn_result(True) first (or use cache.stack_head_results, which "
                "computes them from hook_z)"
            )

    @contextmanager
    def hooks(
        self,
        fwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006 - TL's signature
        bwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedTransformer]:
        """Add hooks for the duration of a `with` block (TransformerLens' `hooks()`).

        On exit, also after an exception or a `KeyboardInterrupt` at any moment (even while
        the hooks are being added or removed), every hook this block added is gone; hooks added
        with `add_hook` inside the block stay, as in TransformerLens.

        Examples:
            >>> from mmlens.ablations import zero_mlp
            >>> with model.hooks(fwd_hooks=zero_mlp(range(4))):
            ...     ablated = model(inp)
            >>> torch.equal(ablated, model(inp))     # the hooks are gone after the block
            False
        """
        with self._temporary_hooks(keep_untracked=False, clear_contexts=clear_contexts) as level:
            for name, hook in fwd_hooks:
                self._enable_hook(name=name, hook=hook, dir="fwd")
            for name, hook in bwd_hooks:
                self._enable_hook(name=name, hook=hook, dir="bwd")
            if not reset_hooks_end:
                level.clear()  # the caller removes them (backward hooks for a later backward)
            yield self

    @contextmanager
    def _temporary_hooks(self, keep_untracked: bool, clear_contexts: bool = False) -> Iterator:
        """A context level: on exit, every hook added since entry at this level, or not recorded
        at all, is removed (whatever interrupted), and the level is restored.

        Yields a one-element list holding the level; emptying it keeps the hooks.
        """
        outer_level, first_id = self.context_level, next_hook_id()
        level = [outer_level + 1]
        try:
            self.context_level = level[0]
            yield level
        finally:
            if level:

                def added_here(handle: Any, hook_id: int) -> bool:
                    if hook_id < first_id:
                        return False
                    if handle is None:
                        return not keep_untracked
                    return handle.context_level == level[0] and not handle.is_permanent

                try:
                    remove_hooks(self.hook_points(), added_here)
                    if clear_contexts:
                        self.clear_contexts()
                finally:
                    self.context_level = outer_level
            else:
                self.context_level = outer_level

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove hooks (TransformerLens' `reset_hooks`); with `level=None`, every hook on the
        model's hook points except permanent ones (unless `including_permanent`), raw PyTorch
        hooks included, and the context level goes back to 0.

        Examples:
            >>> model.reset_hooks()   # a clean model, whatever an interrupted cell left behind
        """

        def selected(handle: Any, hook_id: int) -> bool:
            if handle is None:
                return level is None
            if handle.is_permanent and not including_permanent:
                return False
            return level is None or handle.context_level == level

        remove_hooks(self.hook_points(), selected, direction)
        if clear_contexts:
            self.clear_contexts()
        if level is None:
            self.context_level = 0
        self.is_caching = False

    def _unknown_hook_message(self, name: str) -> str:
        for prefix, n_layers in self._layer_counts().items():
            match = re.match(rf"^{re.escape(prefix)}blocks\.(-?\d+)\.", name)
            if match and not 0 <= int(match.group(1)) < n_layers:
                return (
                    f"hook {name!r}: layer {match.group(1)} does not exist; "
                    f"'{prefix}blocks' has layers 0..{n_layers - 1}"
                )
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"hook {name!r} does not exist in this model{hint} (see model.hook_dict)"

    def _layer_counts(self) -> dict[str, int]:
        return {"": self.cfg.n_layers}

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: str | list[str] | Callable[[str], bool] | None = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run and return `(output, cache)`; the cache is a `transformer_lens.ActivationCache`.

        Args:
            names_filter: a hook name, a list of names, or a predicate on names (default: all).
            device: where cached tensors go (default: where they are computed).
            remove_batch_dim: drop the batch axis (batch of 1 only).
            incl_bwd: also cache gradients (`name + "_grad"`); the output must be a scalar
                (e.g. `return_type="loss"`), as in TransformerLens.

        Caching hooks are plain PyTorch forward hooks added after any hooks already on the
        model (so the cache holds edited values) and removed whatever interrupts the call. They
        bypass TransformerLens' per-hook bookkeeping, whose cost dominated a full cache of a
        large model on a GPU (see `bench/forward.py`). On the CPU, the first call makes glibc
        keep freed memory for reuse (`mmlens.perf`; opt out with MMLENS_KEEP_FREED_MEMORY=0):
        a full cache allocates hundreds of MB per call, and re-faulting it cost ~40%.

        Examples:
            >>> logits, cache = model.run_with_cache(inp, names_filter=lambda n: "resid" in n)
            >>> cache.accumulated_resid(apply_ln=True).shape  # [n_layers + 1, batch, pos, d_model]
            torch.Size([7, 1, 105, 128])
        """
        if incl_bwd:
            output, cache_dict = super().run_with_cache(
                *model_args,
                names_filter=names_filter,
                device=device,
                remove_batch_dim=remove_batch_dim,
                incl_bwd=True,
                **model_kwargs,
            )
            return output, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

        if self.W_E.device.type == "cpu":
            enable_for_cpu_caching()
        cache_dict: dict[str, torch.Tensor] = {}

        def save(hook_point: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            stored = output.detach().to(device)
            cache_dict[hook_point.name] = stored[0] if remove_batch_dim else stored

        names = self.hook_names(names_filter)
        with self._temporary_hooks(keep_untracked=False):
            for name in names:
                self.hook_dict[name].register_forward_hook(save)
            output = self(*model_args, **model_kwargs)
        if remove_batch_dim and output is not None and output.shape[0] != 1:
            raise ValueError("remove_batch_dim=True needs a batch of 1")
        return output, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def hook_names(
        self, names_filter: str | list[str] | Callable[[str], bool] | None = None
    ) -> list[str]:
        """Hook point names selected by a name, a list of names or a predicate (None: all).

        Names that do not exist raise a ValueError that says what does.
        """
        if names_filter is None:
            return list(self.hook_dict)
        if callable(names_filter):
            return [name for name in self.hook_dict if names_filter(name)]
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        for name in names:
            self._check_hook_name(name)
        return names

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
            from mmlens.inputs import processor_fingerprint

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
        inputs = self.model_inputs(
            input, input_ids=input_ids, attention_mask=attention_mask, **multimodal
        )
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Image features are only needed where image tokens are new (not for cached steps).
        resid = self.embed_input(input_ids, **{k: v for k, v in inputs.items() if v is not None})

        resid, positions = self._run_decoder(resid, attention_mask, past_kv_cache, stop_at_layer)
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

    def _run_decoder(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        cache: KVCache | None = None,
        stop_at_layer: int | None = None,
        record: list | None = None,
        last_only: bool = False,
    ) -> tuple[Float[torch.Tensor, "batch kept_pos d_model"], Int[torch.Tensor, "batch kept_pos"]]:
        """The decoder blocks; returns the residual stream and its original positions.

        Tracks the original position of every token so that a `hook_prune` hook can remove
        tokens mid-model: from that block on the residual stream, keys and values (and the KV
        cache) really shrink, and the survivors keep their rotary positions. `cache` holds the
        keys and values of earlier positions and is extended in place; `record` receives each
        layer's entering residual stream and its positions (`run_prefix`). `last_only`: the
        final block computes the last position's output only (every position's keys).
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
            rotary_position_ids(all_seen)[:, n_seen:],
        )
        window = self.cfg.sliding_window
        # Plain causal attention (SDPA's causal kernel) is exact while nothing is cached,
        # padded or pruned and the sliding window does not bite.
        rows.plain_causal = bool(rows.is_real.all()) and (
            window is None or n_seen + n_new <= window
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
        window = self.cfg.sliding_window
        if rows.variant is not None:
            mask = rows.memo(
                "mask",
                (state.key_positions, state.query_positions),
                lambda: suffix_mask(
                    state.query_positions,
                    state.variant,
                    state.key_positions,
                    rows.key_variant(past),
                    state.key_is_real,
                    rows.variant_start,
                    window,
                ),
            )
        elif rows.plain_causal and past is None and query_index is None:
            mask = None  # index-causal attention is exact (survivors keep their order)
        else:
            mask = rows.memo(
                "mask",
                (state.key_positions, state.query_positions),
                lambda: causal_padding_mask(
                    state.query_positions, state.key_positions, state.key_is_real, window
                ),
            )
        rotary = rows.memo(
            "rotary", (rows.rotary_ids,), lambda: self.rotary(rows.rotary_ids, rows.resid.dtype)
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

    # ------------------------------------------------------------------ prefix and suffix
    def run_prefix(
        self,
        input: Any = None,
        *,
        logits: Literal["all", "last"] | None = "all",
        **kwargs: Any,
    ) -> PrefixState:
        """Run `input` once and keep what later variants of it can reuse (`run_suffix`).

        Hooks active on the model (`with model.hooks(...)`) apply, as in a forward pass. Keeps
        every layer's entering residual stream, keys and values; `logits` says which logits
        to compute ("all", "last" position only, or None). With "last", the final block computes
        only the last position's output: its hooks from `attn.hook_q` on see that row alone
        (`hook.ctx["sequence"].query_positions`), the ones before it every row.

        Examples:
            >>> prefix = model.run_prefix(inp)
            >>> prefix.logits.shape   # [batch, pos, d_vocab]
            torch.Size([1, 105, 70])
        """
        inputs = self.model_inputs(input, **kwargs)
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        resid = self.embed_input(input_ids, **{k: v for k, v in inputs.items() if v is not None})
        cache = KVCache.empty(self.cfg.n_layers, input_ids.shape[0], input_ids.device)
        record: list = []
        resid, _ = self._run_decoder(
            resid, attention_mask, cache, record=record, last_only=logits == "last"
        )
        return PrefixState(
            logits=None if logits is None else self.to_logits(resid),
            resid_pre=tuple(entering for entering, _ in record),
            positions=tuple(positions for _, positions in record),
            cache=cache,
            attention_mask=attention_mask,
            rotary_ids=rotary_position_ids(attention_mask),
        )

    def run_suffix(
        self,
        prefix: PrefixState,
        start: int | list[int],
        *,
        n_variants: int = 1,
        entry_layers: list[int] | None = None,
        fwd_hooks: list | tuple = (),
        only_last: bool = False,
    ) -> Float[torch.Tensor, "variant_rows suffix_pos d_vocab"]:
        """Logits of `n_variants` variants of every prefix item, each recomputing the positions
        from its `start` on, from its entry layer on, with `fwd_hooks`; the prefix gives the rest.

        Exact for variants that change nothing before their start position nor below their
        entry layer (e.g. an attention knockout whose targets begin at the start, in a window of
        layers that begins at the entry layer): there, every variant equals the prefix run. A
        variant enters at its layer with the prefix's residual stream at its positions, and
        attends to the prefix's keys and values before its start and to its own rows.

        All variants of an item run as one sequence: each holds its own copy of its positions,
        one variant after the other along the position axis (the prefix's keys are read once, and
        one matrix product serves every variant). Hooks see those rows, growing from layer to
        layer as variants enter; `hook.ctx["sequence"].variant` (``[batch, pos]``) says which
        variant each row belongs to. Hooks already on the model apply too, as in the prefix run,
        and must not let earlier positions depend on later ones (a causal model never does).

        Args:
            prefix: `run_prefix` of the input.
            start: first recomputed position (original index), shared or one per variant.
            entry_layers: per variant, its first recomputed layer (default: all 0).
            only_last: return only each variant's last position's logits, ``[rows, d_vocab]``;
                the final block then computes only those rows' outputs (its hooks from
                `attn.hook_q` on see them alone, the ones before it every row).

        Returns:
            ``[batch * n_variants, suffix_pos, d_vocab]`` logits, item-major (rows
            ``i*n_variants ..`` are prefix item i's variants, in the order given), or
            ``[batch * n_variants, d_vocab]`` with `only_last` (variants may then start at
            different positions).

        Examples:
            >>> from mmlens.ablations import attention_knockout
            >>> prefix = model.run_prefix(inp)
            >>> last = inp.positions("last").item()
            >>> hooks = attention_knockout(inp.positions("image"), [last], range(2, 5))
            >>> suffix = model.run_suffix(prefix, last, entry_layers=[2], fwd_hooks=hooks,
            ...                           only_last=True)
            >>> full = model.run_with_hooks(inp, fwd_hooks=hooks)   # the same, from layer 0
            >>> suffix.shape                                 # [variant rows, d_vocab]
            torch.Size([1, 70])
            >>> torch.allclose(suffix[0], full[0, -1], atol=1e-4)
            True
        """
        entry = [0] * n_variants if entry_layers is None else [int(e) for e in entry_layers]
        starts = [start] * n_variants if isinstance(start, int) else [int(s) for s in start]
        if len(entry) != n_variants or not all(0 <= e < self.cfg.n_layers for e in entry):
            raise ValueError(
                f"entry_layers must give one layer in 0..{self.cfg.n_layers - 1} per variant "
                f"({n_variants}), got {entry_layers}"
            )
        if len(starts) != n_variants or not all(0 <= s < prefix.n_positions for s in starts):
            raise ValueError(
                f"start {start} is not a position of the prefix (0..{prefix.n_positions - 1}), "
                f"one for all {n_variants} variants or one per variant"
            )
        if not only_last and len(set(starts)) > 1:
            raise ValueError("variants with different starts can only return only_last logits")
        rows: _Rows | None = None
        variant_start = torch.tensor(starts, device=prefix.attention_mask.device)
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            final = self.cfg.n_layers - 1
            for layer in range(min(entry), self.cfg.n_layers):
                entering = [v for v in range(n_variants) if entry[v] == layer]
                if entering:
                    rows = self._enter(prefix, layer, rows, entering, starts, variant_start)
                past = prefix.cache.layers[layer].before(max(starts))
                self._run_block(layer, rows, past, last_rows=only_last and layer == final)
            if only_last:  # one row per variant, in variant order
                return self.to_logits(rows.resid).flatten(0, 1)
            # One start: every variant holds the same positions; they entered (and lie) in
            # order of their entry layer.
            entered = sorted(range(n_variants), key=lambda v: (entry[v], v))
            segment = [entered.index(v) for v in range(n_variants)]
            resid = rows.resid.unflatten(1, (n_variants, -1))[:, segment]
            return self.to_logits(resid).flatten(0, 1)

    def _enter(
        self,
        prefix: PrefixState,
        layer: int,
        rows: _Rows | None,
        variants: list[int],
        starts: list[int],
        variant_start: torch.Tensor,
    ) -> _Rows:
        """`rows` with `variants` added after them, entering at `layer` with the prefix's
        residual stream there at their positions (>= their start)."""
        positions = prefix.positions[layer]  # on this layer's device
        if rows is not None:
            rows.move_to(positions.device)
        variant_start = variant_start.to(positions.device)
        segments = []
        for variant in variants:
            first = int((positions[0] < starts[variant]).sum())
            if bool(((positions < starts[variant]).sum(1) != first).any()):
                raise ValueError(
                    "batch items keep different numbers of positions before the suffix after "
                    "pruning; run these samples one at a time"
                )
            held = positions[:, first:]
            # The mask and rotary ids stay where the prefix started; `held` is on this layer's
            # device, which a device map may make another one.
            on_first = held.to(prefix.attention_mask.device)
            segments.append(
                _Rows(
                    prefix.resid_pre[layer][:, first:],
                    held,
                    prefix.attention_mask.gather(1, on_first).bool().to(held.device),
                    prefix.rotary_ids.gather(1, on_first).to(held.device),
                    variant=torch.full_like(held, variant),
                    variant_start=variant_start,
                )
            )
        return _Rows.joined(([rows] if rows is not None else []) + segments)

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


class _Rows:
    """The rows a decoder pass is computing and what they need, updated block by block:
    residual stream, original positions, real-token flags, rotary positions, and (suffix runs)
    which variant each row belongs to. Masks and rotary tables are memoised until the
    positions change.
    """

    def __init__(
        self,
        resid: torch.Tensor,
        positions: torch.Tensor,
        is_real: torch.Tensor,
        rotary_ids: torch.Tensor,
        variant: torch.Tensor | None = None,
        variant_start: torch.Tensor | None = None,
    ):
        self.resid, self.positions, self.is_real = resid, positions, is_real
        self.rotary_ids, self.variant, self.variant_start = rotary_ids, variant, variant_start
        self.plain_causal = False
        self._memo: dict[str, tuple[tuple[torch.Tensor, ...], Any]] = {}

    def memo(self, name: str, inputs: tuple[torch.Tensor, ...], make: Callable[[], Any]) -> Any:
        """`make()`, reused while `inputs` are the same tensor objects as last time (layers
        share their masks until a pruning point; the entry keeps `inputs` alive)."""
        entry = self._memo.get(name)
        if entry is None or any(a is not b for a, b in zip(entry[0], inputs, strict=True)):
            entry = self._memo[name] = (inputs, make())
        return entry[1]

    def move_to(self, device: torch.device) -> None:
        """Move every row tensor to `device` (the next block's, in a model on several
        devices); memoised masks are dropped with the old tensors."""
        if self.resid.device == device:
            return
        for name in ("resid", "positions", "is_real", "rotary_ids", "variant", "variant_start"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self._memo.clear()

    def keep(self, index: Int[torch.Tensor, "batch kept"], resid: bool = True) -> None:
        """Keep the rows at `index`: pruning, or (`resid=False`) after a block that computed
        outputs for those rows only, so that `resid` already holds just them."""
        if resid:
            self.resid = self.resid.gather(1, index[..., None].expand(-1, -1, self.resid.shape[-1]))
        self.positions = self.positions.gather(1, index)
        self.is_real = self.is_real.gather(1, index)
        self.rotary_ids = self.rotary_ids.gather(1, index)
        if self.variant is not None:
            self.variant = self.variant.gather(1, index)

    def last_rows(self) -> Int[torch.Tensor, "batch n"]:
        """Index of the last row (of each variant, in variant order: its rows are in increasing
        position order)."""
        index = torch.arange(self.positions.shape[1], device=self.positions.device)
        if self.variant is None:
            return index[-1:].expand(self.positions.shape[0], 1)
        n_variants = self.variant_start.shape[0]
        last = torch.full((self.variant.shape[0], n_variants), -1, device=self.variant.device)
        return last.scatter_reduce(1, self.variant, index.expand_as(self.variant), "amax")

    def state(
        self, layer: int, past: LayerKV | None, query_index: torch.Tensor | None = None
    ) -> SequenceState:
        """The block's state; with `query_index`, only those rows are queries."""
        if query_index is not None:
            keys = self.state(layer, past)
            variant = None if self.variant is None else self.variant.gather(1, query_index)
            queries = self.positions.gather(1, query_index)
            return SequenceState(layer, queries, keys.key_positions, keys.key_is_real, variant)
        if past is None:
            keys = (self.positions, self.is_real)
        else:
            keys = self.memo(
                "keys",
                (past.positions, self.positions),
                lambda: (
                    torch.cat((past.positions, self.positions), 1),
                    torch.cat((past.is_real, self.is_real), 1),
                ),
            )
        return SequenceState(layer, self.positions, *keys, self.variant)

    def key_variant(self, past: LayerKV | None) -> torch.Tensor:
        """Which variant each key belongs to (-1: the prefix)."""
        if past is None:
            return self.variant
        return torch.cat((torch.full_like(past.positions, -1), self.variant), dim=1)

    @staticmethod
    def joined(parts: list[_Rows]) -> _Rows:
        """The rows of `parts`, one after the other along the position axis."""
        if len(parts) == 1:
            return parts[0]

        def join(name: str) -> torch.Tensor:
            return torch.cat([getattr(part, name) for part in parts], dim=1)

        return _Rows(
            join("resid"),
            join("positions"),
            join("is_real"),
            join("rotary_ids"),
            variant=join("variant"),
            variant_start=parts[-1].variant_start,
        )
