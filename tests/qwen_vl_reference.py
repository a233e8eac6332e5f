"""The original Qwen-VL code, transcribed (not imported) as the reference of tests/test_qwen_vl.py:
``modeling_qwen.py`` (``QWenModel`` / ``QWenLMHeadModel``: fused ``c_attn``, rotary on the whole
head, causal attention plus the padding mask, SwiGLU ``w1 * silu(w2)``, RMSNorm, the image
features written over the positions between ``<img>`` and ``</img>``), ``visual.py``
(``VisionTransformer``: ``get_abs_pos``, ``VisualAttention`` with its per-head fused
``in_proj``, ``Resampler`` on ``nn.MultiheadAttention``, ``image_transform``),
``tokenization_qwen.py`` (``QWenTokenizer.tokenize`` on tiktoken, ``<img>path</img>`` padded to the
span) and ``qwen_generation_utils.make_context``. Batch-first tensors where the release permutes
to sequence-first and back; the arithmetic is the release's. The hard-coded 256 queries and
16 x 16 position table are read from the config (`mmlens.testing.qwen_vl` writes smaller ones);
images come from their paths, as the release loads them.
"""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tiktoken.load import load_tiktoken_bpe
from torch import nn

from mmlens.models.qwen_vl.release import QWEN_SPLIT_PATTERN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)
IMAGE_ST = (
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<img>",
    "</img>",
    "<imgpad>",
)


class QWenTokenizer:
    def __init__(self, folder: Path, img_token_span: int):
        self.mergeable_ranks = load_tiktoken_bpe(str(folder / "qwen.tiktoken"))
        self.special_tokens = {
            token: index
            for index, token in enumerate(SPECIAL + IMAGE_ST, start=len(self.mergeable_ranks))
        }
        self.tokenizer = tiktoken.Encoding(
            "Qwen",
            pat_str=QWEN_SPLIT_PATTERN,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.decoder = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.encoder = {v: k for k, v in self.decoder.items()}
        self.img_token_span = img_token_span
        self.im_start_id = self.special_tokens["<|im_start|>"]
        self.im_end_id = self.special_tokens["<|im_end|>"]

    def tokenize(self, text, allowed_special="all"):
        text = unicodedata.normalize("NFC", text)
        tokens = [
            self.decoder[t]
            for t in self.tokenizer.encode(
                text, allowed_special=allowed_special, disallowed_special=()
            )
        ]

        def encode_imgurl(img_tokens):
            img_url = b"".join(img_tokens[1:-1])
            out = [self.decoder[byte] for byte in img_url]
            assert len(out) <= self.img_token_span
            out.extend(["<imgpad>"] * (self.img_token_span - len(out)))
            return ["<img>", *out, "</img>"]

        output, end = [], 0
        while True:
            start = next((i for i in range(end, len(tokens)) if tokens[i] == "<img>"), -1)
            if start == -1:
                break
            output.extend(tokens[end:start])
            end = tokens.index("</img>", start)
            output.extend(encode_imgurl(tokens[start : end + 1]))
            end += 1
        output.extend(tokens[end:])
        return output

    def encode(self, text, allowed_special="all"):
        return [self.encoder[token] for token in self.tokenize(text, allowed_special)]

    def make_context(self, query, system="You are a helpful assistant."):
        """qwen_generation_utils.make_context, chat_format 'chatml', no history."""
        nl = self.encode("\n")

        def role(name, content):
            return self.encode(name, set(IMAGE_ST)) + nl + self.encode(content, set(IMAGE_ST))

        system_tokens = [self.im_start_id] + role("system", system) + [self.im_end_id]
        return (
            system_tokens + nl + [self.im_start_id] + role("user", query) + [self.im_end_id]
            + nl + [self.im_start_id] + self.encode("assistant") + nl
        )  # fmt: skip


def image_transform(path, image_size):
    """Resize((s, s), BICUBIC) on the PIL image, ToTensor, Normalize."""
    image = Image.open(path).convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    tensor = array.float().div(255)
    return (tensor - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def get_abs_pos(abs_pos, tgt_size):
    src_size = int(math.sqrt(abs_pos.size(0)))
    tgt_size = int(math.sqrt(tgt_size))
    if src_size != tgt_size:
        return (
            F.interpolate(
                abs_pos.float().reshape(1, src_size, src_size, -1).permute(0, 3, 1, 2),
                size=(tgt_size, tgt_size),
                mode="bicubic",
                align_corners=False,
            )
            .permute(0, 2, 3, 1)
            .flatten(0, 2)
            .to(dtype=abs_pos.dtype)
        )
    return abs_pos


class VisualAttention(nn.Module):
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.heads, self.head_dim = num_heads, embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.norm_factor = math.sqrt(self.head_dim)

    def forward(self, x):  # [batch, seq, width]
        b, s, _ = x.shape
        mixed = self.in_proj(x).view(b, s, self.heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)  # each [b, s, heads, head_dim]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        probs = torch.matmul(q / self.norm_factor, k.transpose(-2, -1)).softmax(dim=-1)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.out_proj(context)


class VisualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        mlp_width = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio):
        super().__init__()
        self.resblocks = nn.ModuleList(
            VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)
        )

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    def __init__(self, n_queries, embed_dim, num_heads, kv_dim):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(n_queries, embed_dim), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(n_queries, embed_dim))
        self.kv_proj = (
            nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        )
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        n = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(
            q.unsqueeze(1).repeat(1, n, 1) + self.pos_embed.unsqueeze(1),
            x + pos_embed.unsqueeze(1),
            x,
        )[0]
        return out.permute(1, 0, 2)


class VisionTransformer(nn.Module):
    def __init__(self, visual):
        super().__init__()
        width, patch = visual["width"], visual["patch_size"]
        self.image_size = visual["image_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(visual["n_positions"], width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = Transformer(
            width, visual["layers"], visual["heads"], visual["mlp_ratio"]
        )
        output_dim = visual["output_dim"]
        self.attn_pool = Resampler(visual["n_queries"], output_dim, output_dim // 128, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(output_dim, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.attn_pool(x)
        x = self.ln_post(x)
        return x @ self.proj

    def encode(self, image_paths):
        return self(torch.stack([image_transform(path, self.image_size) for path in image_paths]))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotate_half(x):
    x1, x2 = x.reshape(*x.shape[:-1], 2, -1).unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


class QWenAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.head_dim = config["num_attention_heads"], config["kv_channels"]
        projection = self.heads * self.head_dim
        self.c_attn = nn.Linear(config["hidden_size"], 3 * projection)
        self.c_proj = nn.Linear(projection, config["hidden_size"], bias=not config["no_bias"])

    def forward(self, x, rotary, attention_mask):
        b, s, _ = x.shape
        query, key, value = self.c_attn(x).split(self.heads * self.head_dim, dim=2)
        query, key, value = (t.view(b, s, self.heads, self.head_dim) for t in (query, key, value))
        cos, sin = rotary  # [1, s, 1, head_dim]
        query = (query.float() * cos + rotate_half(query.float()) * sin).type_as(query)
        key = (key.float() * cos + rotate_half(key.float()) * sin).type_as(key)
        query, key, value = (t.permute(0, 2, 1, 3) for t in (query, key, value))
        weights = torch.matmul(query, key.transpose(-1, -2)) / value.size(-1) ** 0.5
        causal = torch.tril(torch.ones(s, s, dtype=torch.bool)).view(1, 1, s, s)
        weights = torch.where(causal, weights, torch.finfo(weights.dtype).min)
        weights = weights + attention_mask
        weights = F.softmax(weights.float(), dim=-1).type(query.dtype)
        output = torch.matmul(weights, value).transpose(1, 2).reshape(b, s, -1)
        return self.c_proj(output)


class QWenMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        ff_dim = config["intermediate_size"] // 2
        self.w1 = nn.Linear(config["hidden_size"], ff_dim, bias=not config["no_bias"])
        self.w2 = nn.Linear(config["hidden_size"], ff_dim, bias=not config["no_bias"])
        self.c_proj = nn.Linear(ff_dim, config["hidden_size"], bias=not config["no_bias"])

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config["hidden_size"], config["layer_norm_epsilon"])
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config["hidden_size"], config["layer_norm_epsilon"])
        self.mlp = QWenMLP(config)

    def forward(self, x, rotary, attention_mask):
        x = x + self.attn(self.ln_1(x), rotary, attention_mask)
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.h = nn.ModuleList(QWenBlock(config) for _ in range(config["num_hidden_layers"]))
        self.ln_f = RMSNorm(config["hidden_size"], config["layer_norm_epsilon"])
        self.visual = VisionTransformer(config["visual"])

    def rotary(self, seq_len):
        """RotaryEmbedding at ntk_alpha 1 (every length up to seq_length): positions 0..s-1."""
        dim = self.config["kv_channels"]
        inv_freq = 1.0 / (self.config["rotary_emb_base"] ** (torch.arange(0, dim, 2).float() / dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=inv_freq.dtype), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
        return emb.cos(), emb.sin()

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        start_id = self.config["visual"]["image_start_id"]
        images = img_pos = None
        if torch.any(input_ids == start_id):
            bos_pos = torch.where(input_ids == start_id)
            eos_pos = torch.where(input_ids == start_id + 1)
            img_pos = torch.stack((bos_pos[0], bos_pos[1], eos_pos[1]), dim=1)
            paths = []
            for i, a, b in img_pos:
                image = input_ids[i][a + 1 : b - 1].tolist()
                image = image[: image.index(start_id + 2)]
                paths.append(bytes(image).decode("utf-8"))
            images = self.visual.encode(paths)
        hidden = self.wte(input_ids)
        if images is not None:
            hidden = hidden.clone()
            for index, (i, a, b) in enumerate(img_pos):
                hidden[i][a + 1 : b] = images[index]
        mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        rotary = self.rotary(input_ids.shape[1])
        states = [hidden]
        for block in self.h:
            hidden = block(hidden, rotary, mask)
            states.append(hidden)
        hidden = self.ln_f(hidden)
        return hidden, states


class QWenLMHeadModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    @classmethod
    def from_release(cls, folder: Path, config: dict) -> QWenLMHeadModel:
        model = cls(config)
        weights = folder / "model.safetensors"
        tensors = (
            load_file(weights)
            if weights.is_file()
            else torch.load(folder / "pytorch_model.bin", weights_only=True)
        )
        model.load_state_dict(tensors, strict=True)
        return model.eval()

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, states = self.transformer(input_ids, attention_mask)
        return self.lm_head(hidden), states

    def greedy(self, input_ids, max_new_tokens):
        """generate() with do_sample=False, recomputed from the start at each step."""
        ids = input_ids
        for _ in range(max_new_tokens):
            logits, _ = self(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids
