"""Tiny random-weight Llama models made by the project itself, in both file forms.

`write_tiny_llama` writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json); `write_tiny_gguf` writes the same model as llama.cpp's convert_hf_to_gguf
would (Q/K rows permuted, llama3 scaling as a rope_freqs tensor, 2-D weights optionally quantized).
The tokenizer is a byte-level BPE trained here on a fixed corpus (deterministic, ~400 tokens).
Nothing is downloaded. Imports no kvserve code, so the loaders are checked against an independent
writer.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_VOCAB_SIZE = 400
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
BOS_ID, EOS_ID = 1, 2
# SmolLM2's template: ChatML with a default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
QUANT_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_CORPUS = [
    "The KV cache keeps the keys and values of earlier tokens, so each new token costs less.",
    "Attention reads every cached key; paged blocks of 16 tokens hold them in a pool.",
    "def forward(self, x):\n    return self.proj(torch.relu(x)) + x  # residual\n",
    "for i in range(10):\n\tprint(i, i * i, 3.14159)\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 65536 3.5e-3 0x1F",
    "Unicode: héllo wörld, naïve café, 日本語, Привет, مرحبا, emoji 😀🚀",
    "JSON: {\"role\": \"user\", \"content\": \"hi\"} and [1, 2, 3]",
    "I'm sure you're right; it's what we've said and they'll agree.",
    "The quick brown fox jumps over the lazy dog. THE END!",
    "<|im_start|>user\nWhat is a prefix cache?<|im_end|>\n<|im_start|>assistant\n",
]


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    # The SmolLM2 ("smollm") split: digits one by one, then GPT-2's byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> Tokenizer:
    """A fresh copy of the tiny byte-level BPE tokenizer (deterministic for a given corpus)."""
    return Tokenizer.from_str(_tiny_tokenizer_json())


def tiny_config(*, tie: bool = True, rope_scaling: dict | None = None,
                wide: bool = False) -> dict:
    """wide: rows of 256 and 512 inputs, what GGUF's k-quant super-blocks need."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 256 if wide else 64, "intermediate_size": 512 if wide else 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64 if wide else 16,
        "vocab_size": tiny_tokenizer().get_vocab_size(), "max_position_embeddings": 256,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": tie,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    if rope_scaling is not None:
        config["rope_scaling"] = dict(rope_scaling)
    return config


def tiny_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random float32 weights in Hugging Face names (std 0.1; norms around 1)."""
    gen = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], \
        config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)})
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        out[name] = 1.0 + 0.1 * noise if len(shape) == 1 else 0.1 * noise
    return out


def write_tiny_llama(dir: str | Path, *, tie: bool = True, rope_scaling: dict | None = None,
                     seed: int = 0, wide: bool = False) -> Path:
    """Writes the tiny model as a Hugging Face folder and returns its path."""
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(tie=tie, rope_scaling=rope_scaling, wide=wide)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tiny_weights(config, seed), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    write_tiny_tokenizer(folder)
    return folder


def write_tiny_hybrid(folder: str | Path, layer_types: tuple[int, ...] = (1, 1, 1, 0, 0),
                      window: int = 8) -> Path:
    """A tiny Mistral whose layers are windowed (1) or full (0) as layer_types says: a hybrid
    model, one KV group per layer type and size (kvcache/groups.py)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    config.update(architectures=["MistralForCausalLM"], model_type="mistral",
                  num_hidden_layers=len(layer_types), sliding_window=window,
                  layer_types=["sliding_attention" if t else "full_attention"
                               for t in layer_types])
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tiny_weights(config, seed=3), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    write_tiny_tokenizer(folder)
    return folder


def write_tiny_tokenizer(folder: Path) -> None:
    """The tiny tokenizer's files and generation config, as a Hugging Face folder has them."""
    (folder / "tokenizer.json").write_text(_tiny_tokenizer_json())
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
                  "eos_token": SPECIAL_TOKENS[EOS_ID], "unk_token": None,
                  "pad_token": SPECIAL_TOKENS[EOS_ID], "add_bos_token": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": 256,
                  "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, 0]}))


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's permute: Hugging Face rotate-half rows -> interleaved pairs."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_freqs(config: dict) -> np.ndarray:
    """The rope_freqs.weight tensor convert_hf_to_gguf writes for llama3 rope scaling."""
    scaling, dim = config["rope_scaling"], config["head_dim"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer_json: str) -> None:
    data = json.loads(tokenizer_json)
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL
             for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_name("tiny-llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["head_dim"])
    if config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if config.get("rope_scaling"):
        orig = config["rope_scaling"]["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(orig)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins ([..., 8] each), as get_scale_min
    unpacks them."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate([
        sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], axis=-1)


def quantize_k(weight: np.ndarray, name: str) -> np.ndarray:
    """A plain round-to-nearest encoder of GGUF's Q4_K, Q5_K and Q6_K (gguf-py has none; llama.cpp
    searches for better scales): valid blocks of `weight` [n, k], k a multiple of 256, for tests.
    Returns [n, bytes per row] uint8."""
    n, k = weight.shape
    x = weight.astype(np.float32).reshape(n, k // 256, 256)
    f16 = lambda v: v.astype(np.float16).view(np.uint8).reshape(n, k // 256, 2)  # noqa: E731
    if name == "Q6_K":
        g = x.reshape(n, k // 256, 16, 16)
        s = np.abs(g).max(-1) / 31  # per 16 values, codes - 32 in -32..31
        d = (s.max(-1, keepdims=True) / 127).astype(np.float16)
        sc = np.where(d > 0, np.round(s / np.maximum(d, 1e-30)), 0).clip(-128, 127)
        step = (d.astype(np.float32) * sc)[..., None]
        q = (np.round(np.where(step > 0, g / np.maximum(step, 1e-30), 0)) + 32).clip(0, 63)
        q = q.reshape(n, k // 256, 2, 128).astype(np.uint8)  # halves of 128
        low, high = q & 15, q >> 4
        ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(n, k // 256, 128)
        hq = high.reshape(n, k // 256, 2, 4, 32)
        qh = (hq[:, :, :, 0] | (hq[:, :, :, 1] << 2) | (hq[:, :, :, 2] << 4)
              | (hq[:, :, :, 3] << 6)).reshape(n, k // 256, 64)
        blocks = [ql, qh, sc.astype(np.int8).view(np.uint8), f16(d[..., 0])]
        return np.concatenate(blocks, axis=-1).reshape(n, -1)
    levels = 15 if name == "Q4_K" else 31
    g = x.reshape(n, k // 256, 8, 32)
    lo = np.minimum(g.min(-1), 0)
    s = (g.max(-1) - lo) / levels
    d = (s.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (-lo.min(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.where(d > 0, np.round(s / np.maximum(d, 1e-30)), 0).clip(0, 63)
    mn = np.where(dmin > 0, np.round(-lo / np.maximum(dmin, 1e-30)), 0).clip(0, 63)
    step = (d.astype(np.float32) * sc)[..., None]
    base = (dmin.astype(np.float32) * mn)[..., None]
    q = np.round(np.where(step > 0, (g + base) / np.maximum(step, 1e-30), 0))
    q = q.clip(0, levels).astype(np.uint8)  # [n, sb, 8, 32]
    pairs = q.reshape(n, k // 256, 4, 2, 32)
    qs = ((pairs[:, :, :, 0] & 15) | ((pairs[:, :, :, 1] & 15) << 4)).reshape(n, k // 256, 128)
    head = [f16(d[..., 0]), f16(dmin[..., 0]), _pack_k_scales(sc, mn)]
    if name == "Q4_K":
        return np.concatenate(head + [qs], axis=-1).reshape(n, -1)
    bits = (q >> 4).transpose(0, 1, 3, 2)  # [n, sb, 32 values, 8 sub-blocks]
    qh = np.packbits(bits, axis=-1, bitorder="little").reshape(n, k // 256, 32)
    return np.concatenate(head + [qh, qs], axis=-1).reshape(n, -1)


K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# a mix as llama.cpp's Q4_K_M writes one: Q6_K for V, the FFN's down projection and the embedding
Q4_K_M = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q6_K"}


def _encode(weight: np.ndarray, qtype: str,
            gguf_tensor: str = "") -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if qtype == "Q4_K_M":
        part = gguf_tensor.split(".")[-2] if gguf_tensor.startswith("blk.") \
            else gguf_tensor.split(".")[0]
        qtype = Q4_K_M.get(part, "Q4_K")
    kind = gguf.GGMLQuantizationType[qtype]
    if weight.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:  # norms stay F32, as llama.cpp
        return weight.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype in K_QUANTS:
        return quantize_k(weight, qtype), kind
    return gguf.quants.quantize(weight, kind), kind


def write_tiny_gguf(path: str | Path, hf_dir: str | Path, *, qtype: str = "F32",
                    arch: str = "llama", drop: tuple[str, ...] = ()) -> Path:
    """Converts the tiny Hugging Face folder to GGUF the way convert_hf_to_gguf does; `drop`
    leaves out the tensors with those GGUF names (for error tests)."""
    hf_dir, path = Path(hf_dir), Path(path)
    config = json.loads((hf_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), arch)
    _add_hparams(writer, config)
    _add_tokenizer(writer, (hf_dir / "tokenizer.json").read_text())
    if config.get("rope_scaling"):
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    for name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        if gguf_name(name) in drop:
            continue
        weight = tensor.numpy()
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, config["num_key_value_heads"])
        data, kind = _encode(weight, qtype, gguf_name(name))
        raw = None if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
            else kind
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style BPE vocabulary (tokens, scores, token types) as llama.cpp
    stores Llama 2 / Mistral ones: <unk>, <s>, </s>, 256 byte tokens, then pieces by rank."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces))
    return tokens, scores, [int(t) for t in types]


def write_spm_gguf(path: str | Path) -> Path:
    """A GGUF holding only a "llama" (SentencePiece) tokenizer: for tokenizer tests."""
    tokens, scores, types = spm_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_wrong_arch_gguf(path: str | Path, arch: str = "gpt2") -> Path:
    """A minimal GGUF of an architecture kvserve does not support."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def released_per_step(engine, request_id: str):
    """Step `engine` until `request_id` ends; after each step yield (request, its table, the
    block ids released this step: each the id a table index held before it became HOLE)."""
    from kvserve.kvcache.block_manager import HOLE

    manager, seen = engine.block_manager, {}
    while engine.has_unfinished_requests():
        engine.step()
        r = engine.requests.get(request_id)
        table = manager.block_ids(request_id)
        if r is None or not table:
            return
        released = [seen.pop(i) for i, b in enumerate(table) if b == HOLE and i in seen]
        seen.update((i, b) for i, b in enumerate(table) if b != HOLE)
        yield r, table, released
