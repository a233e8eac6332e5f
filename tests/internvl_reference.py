"""A transcription of the original InternVL2 release's code, independent of mmlens, as the
reference for tests/test_internvl_release.py: ``modeling_intern_vit.py`` (InternViT: fused
``qkv``, QK-norm over all heads, layer scale ``ls1``/``ls2``), ``modeling_internvl_chat.py``
(``extract_feature``: drop the class token, ``pixel_shuffle`` (``ps_version`` v1 or v2),
``mlp1``; ``forward``: the image features replace the ``<IMG_CONTEXT>`` embeddings),
``modeling_internlm2.py`` (the grouped ``wqkv``, rotary, ``feed_forward``), the README's
``dynamic_preprocess`` / ``build_transform`` (PIL in place of torchvision's ``T.Resize``, which
calls PIL on PIL images), ``conversation.py``'s ``internlm2-chat`` prompt and ``chat()``'s
image-token expansion, and ``tokenization_internlm2.py`` (SentencePiece's ``encode`` of each
text piece between added tokens, BOS first). Read straight from the checkpoint's files.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN = "<img>", "</img>", "<IMG_CONTEXT>"
INTERNLM2_CHAT_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)


# ------------------------------------------------------------------ preprocessing (README)
def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def transform(image: Image.Image, input_size: int) -> torch.Tensor:
    """``build_transform``: RGB, Resize((s, s), BICUBIC), ToTensor, Normalize."""
    image = image.convert("RGB")
    if image.size != (input_size, input_size):
        image = image.resize((input_size, input_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def load_image(image: Image.Image, input_size: int, max_num: int = 12) -> torch.Tensor:
    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([transform(tile, input_size) for tile in images])


# ------------------------------------------------------------------ tokenizer and prompt
class InternLM2Tokenizer:
    """``tokenization_internlm2.py`` as transformers' slow tokenizer runs it: the text split
    around the added tokens, each other piece through ``sp_model.encode(text, out_type=str)``,
    ``<s>`` first (``add_bos_token``). ``sp_model.encode`` is transcribed from SentencePiece's
    BPE model (``bpe_model.cc``): identity normalisation, a dummy prefix and spaces as ``▁``;
    characters, user-defined pieces matched whole and frozen; then repeatedly the adjacent pair
    whose concatenation is the highest-scoring piece (ties: leftmost) merged; pieces outside the
    vocabulary as their UTF-8 bytes (byte fallback)."""

    def __init__(self, folder: Path):
        from transformers.convert_slow_tokenizer import import_protobuf

        proto = import_protobuf().ModelProto()
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
        normal, user_defined = 1, 4
        self.ids = {piece.piece: index for index, piece in enumerate(proto.pieces)}
        self.scores = {
            piece.piece: piece.score
            for piece in proto.pieces
            if piece.type in (normal, user_defined)
        }
        self.user_defined = sorted(
            (piece.piece for piece in proto.pieces if piece.type == user_defined),
            key=len,
            reverse=True,
        )
        assert proto.normalizer_spec.add_dummy_prefix and proto.trainer_spec.byte_fallback
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        self.added = {v["content"]: int(k) for k, v in settings["added_tokens_decoder"].items()}
        self.bos_id = self.ids["<s>"]

    def sp_encode(self, text: str) -> list[int]:
        text = "▁" + text.replace(" ", "▁")
        symbols, index = [], 0
        while index < len(text):
            match = next((u for u in self.user_defined if text.startswith(u, index)), None)
            symbols.append((match or text[index], match is not None))
            index += len(match or text[index])
        while True:
            best = None
            for k in range(len(symbols) - 1):
                (left, frozen_left), (right, frozen_right) = symbols[k], symbols[k + 1]
                score = self.scores.get(left + right)
                if frozen_left or frozen_right or score is None:
                    continue
                if best is None or score > best[0]:
                    best = (score, k)
            if best is None:
                break
            k = best[1]
            symbols[k : k + 2] = [(symbols[k][0] + symbols[k + 1][0], False)]
        ids = []
        for piece, _ in symbols:
            if piece in self.scores:
                ids.append(self.ids[piece])
            else:
                ids += [self.ids[f"<0x{byte:02X}>"] for byte in piece.encode("utf-8")]
        return ids

    def encode(self, text: str) -> list[int]:
        pattern = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        ids = [self.bos_id]
        for piece in re.split(f"({pattern})", text):
            if piece in self.added:
                ids.append(self.added[piece])
            elif piece:
                ids += self.sp_encode(piece)
        return ids


INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
CONVERSATIONS = {  # conversation.py: (system message, separator), both MPT style
    "internlm2-chat": (INTERNLM2_CHAT_SYSTEM, "<|im_end|>"),
    "internvl2_5": (INTERNVL2_5_SYSTEM, "<|im_end|>\n"),
}


def chat_query(
    question: str, num_patches_list: list[int], num_image_token: int, template="internlm2-chat"
) -> str:
    """``chat()`` / ``batch_chat()``: ``<image>\\n`` before the question, the conversation
    (MPT style: system, separator, each role and message then the separator, the assistant's
    role last), each ``<image>`` replaced by its tokens."""
    if num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    system, sep = CONVERSATIONS[template]
    query = f"<|im_start|>system\n{system}{sep}"
    query += f"<|im_start|>user\n{question}{sep}<|im_start|>assistant\n"
    for num_patches in num_patches_list:
        image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_image_token * num_patches
        query = query.replace("<image>", image_tokens + IMG_END_TOKEN, 1)
    return query


# ------------------------------------------------------------------ model
class Reference:
    """InternVLChatModel with an InternLM2 decoder, eager attention, fp32."""

    def __init__(self, folder: Path):
        self.config = json.loads((folder / "config.json").read_text())
        self.w = load_file(str(folder / "model.safetensors"))
        self.vision = self.config["vision_config"]
        self.llm = self.config["llm_config"]

    # InternViT ----------------------------------------------------------------
    def _norm(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        eps = self.vision["layer_norm_eps"]
        if self.vision["norm_type"] == "rms_norm":
            return rms_norm(x, self.w[prefix + ".weight"], eps)
        return F.layer_norm(
            x, x.shape[-1:], self.w[prefix + ".weight"], self.w[prefix + ".bias"], eps
        )

    def vision_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w, p = self.w, "vision_model."
        patch_embeds = F.conv2d(
            pixel_values,
            w[p + "embeddings.patch_embedding.weight"],
            w[p + "embeddings.patch_embedding.bias"],
            stride=self.vision["patch_size"],
        )
        batch, _, height, width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = w[p + "embeddings.class_embedding"].expand(batch, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        pos = w[p + "embeddings.position_embedding"]
        side = int(math.sqrt(pos.shape[1] - 1))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (height, width) != (side, side):
            grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, -1, height * width).permute(0, 2, 1)
        hidden = embeddings + torch.cat([pos[:, :1], grid], dim=1)
        heads = self.vision["num_attention_heads"]
        for layer in range(self.vision["num_hidden_layers"]):
            lp = f"{p}encoder.layers.{layer}."
            x = self._norm(lp + "norm1", hidden)
            B, N, C = x.shape
            qkv = F.linear(x, w[lp + "attn.qkv.weight"], w.get(lp + "attn.qkv.bias"))
            qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if self.vision["qk_normalization"]:
                B_, H_, N_, D_ = q.shape
                eps = self.vision["layer_norm_eps"]
                q = rms_norm(q.transpose(1, 2).flatten(-2, -1), w[lp + "attn.q_norm.weight"], eps)
                q = q.view(B_, N_, H_, D_).transpose(1, 2)
                k = rms_norm(k.transpose(1, 2).flatten(-2, -1), w[lp + "attn.k_norm.weight"], eps)
                k = k.view(B_, N_, H_, D_).transpose(1, 2)
            attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
            x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
            x = F.linear(x, w[lp + "attn.proj.weight"], w[lp + "attn.proj.bias"])
            hidden = hidden + x * w[lp + "ls1"]
            x = self._norm(lp + "norm2", hidden)
            x = F.linear(x, w[lp + "mlp.fc1.weight"], w[lp + "mlp.fc1.bias"])
            x = F.linear(F.gelu(x), w[lp + "mlp.fc2.weight"], w[lp + "mlp.fc2.bias"])
            hidden = hidden + x * w[lp + "ls2"]
        return hidden  # last_hidden_state (no final norm)

    @staticmethod
    def pixel_shuffle(
        x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v1"
    ) -> torch.Tensor:
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor**2)))
        if ps_version == "v1":  # the release warns and keeps this order
            return x
        return x.permute(0, 2, 1, 3).contiguous()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vit_embeds = self.vision_model(pixel_values)[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(
            vit_embeds, self.config["downsample_ratio"], self.config.get("ps_version", "v1")
        )
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        W = self.w
        x = F.layer_norm(vit_embeds, vit_embeds.shape[-1:], W["mlp1.0.weight"], W["mlp1.0.bias"])
        x = F.gelu(F.linear(x, W["mlp1.1.weight"], W["mlp1.1.bias"]))
        return F.linear(x, W["mlp1.3.weight"], W["mlp1.3.bias"])

    # InternLM2 ------------------------------------------------------------------
    def language_model(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the hidden states entering each layer, then after the final norm."""
        w, llm = self.w, self.llm
        n_heads, n_kv = llm["num_attention_heads"], llm["num_key_value_heads"]
        head_dim = llm["hidden_size"] // n_heads
        groups = n_heads // n_kv
        inv_freq = 1.0 / (llm["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = position_ids[..., None].float() * inv_freq  # [b, q, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [b, 1, q, d]
        b, q_len, _ = inputs_embeds.shape
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        allowed = causal[None] & attention_mask[:, None, :].bool()
        # The release's 4-D mask: the dtype's minimum (not -inf) where a key is hidden
        bias = torch.zeros(b, 1, q_len, q_len).masked_fill(
            ~allowed[:, None], torch.finfo(torch.float32).min
        )
        hidden, states = inputs_embeds, []
        for layer in range(llm["num_hidden_layers"]):
            states.append(hidden)
            lp = f"language_model.model.layers.{layer}."
            x = rms_norm(hidden, w[lp + "attention_norm.weight"], llm["rms_norm_eps"])
            qkv = F.linear(x, w[lp + "attention.wqkv.weight"])
            qkv = qkv.reshape(b, q_len, n_kv, groups + 2, head_dim)  # "b q (h gs d)"
            query = qkv[..., :groups, :].reshape(b, q_len, n_heads, head_dim)
            key, value = qkv[..., -2, :], qkv[..., -1, :]
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
            query = query * cos + rotate_half(query) * sin
            key = key * cos + rotate_half(key) * sin
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
            scores = query @ key.transpose(2, 3) / math.sqrt(head_dim) + bias
            attn = scores.softmax(dim=-1, dtype=torch.float32)
            out = (attn @ value).transpose(1, 2).reshape(b, q_len, n_heads * head_dim)
            hidden = hidden + F.linear(out, w[lp + "attention.wo.weight"])
            x = rms_norm(hidden, w[lp + "ffn_norm.weight"], llm["rms_norm_eps"])
            gate = F.silu(F.linear(x, w[lp + "feed_forward.w1.weight"]))
            up = F.linear(x, w[lp + "feed_forward.w3.weight"])
            hidden = hidden + F.linear(gate * up, w[lp + "feed_forward.w2.weight"])
        hidden = rms_norm(hidden, w["language_model.model.norm.weight"], llm["rms_norm_eps"])
        states.append(hidden)
        return F.linear(hidden, w["language_model.output.weight"]), states

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        img_context_token_id: int,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        input_embeds = self.w["language_model.model.tok_embeddings.weight"][input_ids]
        if pixel_values is not None:
            vit_embeds = self.extract_feature(pixel_values)
            B, N, C = input_embeds.shape
            input_embeds = input_embeds.reshape(B * N, C)
            selected = (input_ids == img_context_token_id).reshape(B * N)
            input_embeds[selected] = vit_embeds.reshape(-1, C)
            input_embeds = input_embeds.reshape(B, N, C)
        # generate(): position_ids = attention_mask.cumsum(-1) - 1, padding at 1
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        return self.language_model(input_embeds, attention_mask, position_ids)

    def greedy(self, input_ids, attention_mask, pixel_values, img_context_token_id, n_new):
        """Greedy decoding, the whole sequence recomputed at each step."""
        for _ in range(n_new):
            logits, _ = self.forward(input_ids, attention_mask, pixel_values, img_context_token_id)
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
        return input_ids


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
