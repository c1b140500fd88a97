"""Text <-> token ids: a `tokenizers.Tokenizer` built from a GGUF's metadata or a Hugging Face
folder, with the model's BOS/EOS ids and chat template (rendered by chat_template.py).

Incremental (streaming) detokenization is left to engine/detokenizer.py; weights to the loaders.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from kvserve.errors import InvalidRequestError, ModelLoadError
from kvserve.model.chat_template import render_chat_template

# llama.cpp's token types (gguf.TokenType)
_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 2, 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the splits llama.cpp applies before byte-level BPE (llama-vocab.cpp).
# "digits": each digit is its own piece first, then the GPT-2 split (StarCoder/SmolLM family).
_PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone",
                     "minerva"), "digits"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx",
                     "pixtral"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), "qwen2"),
}


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    kind = _PRE_SPLITS.get(pre or "default", "gpt2")  # unknown: the GPT-2 split, as HF does
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        _byte_level(True)])
    if kind == "gpt2":
        return _byte_level(True)
    split = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    _byte_level(False)])


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: how byte-level vocabularies spell tokens."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _alphabet_bytes() -> dict[str, int]:
    """The byte alphabet read backwards: printable character -> the byte it spells."""
    return {ch: b for b, ch in _byte_alphabet().items()}


def _byte_level_backend(meta: Mapping[str, Any]) -> Backend:
    """GGUF "gpt2": byte-level BPE from tokens + merges, split the way tokenizer.ggml.pre says."""
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet (a mislabelled raw string) is respelled byte by byte.
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode()): i
             for i, tok in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or ()]
    backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("pre"))
    backend.decoder = decoders.ByteLevel()
    _add_marked_tokens(backend, meta, alphabet)
    return backend


def _spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE stores scores, not merges: every split of a piece into two known pieces
    is a merge, ranked by the merged piece's score (Hugging Face's generate_merges)."""
    ids = {tok: i for i, tok in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in ids and piece[k:] in ids]
        found.extend(sorted(local, key=lambda m: (ids[m[0]], ids[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _sentencepiece_backend(meta: Mapping[str, Any]) -> Backend:
    """GGUF "llama": SentencePiece BPE with byte fallback (Llama 1/2, Mistral v0.1 vocabularies)."""
    tokens = list(meta["tokens"])
    scores = meta.get("scores")
    if scores is None:
        raise ModelLoadError("GGUF tokenizer 'llama' has no tokenizer.ggml.scores")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Backend(BPE(vocab=vocab, merges=_spm_merges(tokens, scores), fuse_unk=True,
                          byte_fallback=True))
    prepend = "first" if meta.get("add_space_prefix", True) else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend,
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend == "first":
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    _add_marked_tokens(backend, meta, None)
    return backend


def _add_marked_tokens(backend: Backend, meta: Mapping[str, Any], alphabet: set | None) -> None:
    """CONTROL (and UNKNOWN) tokens become special tokens, matched whole and skipped on decode;
    USER_DEFINED ones are matched whole but kept on decode, like Hugging Face's GGUF loader."""
    types = meta.get("token_type") or ()
    special, user = [], []
    for token, kind in zip(meta["tokens"], types, strict=False):
        if kind in (_TOKEN_CONTROL, _TOKEN_UNKNOWN):
            # In a byte-level vocab a "control" token spelled outside the alphabet is mislabelled.
            if alphabet is None or set(token) <= alphabet:
                special.append(AddedToken(token, normalized=False, special=True))
        elif kind == _TOKEN_USER_DEFINED:
            user.append(AddedToken(token, normalized=False, special=False))
    backend.add_special_tokens(special)
    backend.add_tokens(user)


_GGUF_BUILDERS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def _gguf_metadata(source: Any) -> dict[str, Any]:
    """tokenizer.ggml.* (and the chat template) as plain values, from a GGUFReader or its fields."""
    fields = getattr(source, "fields", source)
    out = {}
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            value = field.contents() if hasattr(field, "contents") else field
            out[key.removeprefix("tokenizer.ggml.").removeprefix("tokenizer.")] = value
    return out


def _json_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def _template_text(template: Any) -> str | None:
    """A template is a string, or a list of {name, template} of which "default" is the chat one."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template


def _hf_chat_template(path: str, tok_config: Mapping[str, Any]) -> str | None:
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    return _template_text(tok_config.get("chat_template"))


class Tokenizer:
    """Encodes, decodes and renders chat prompts for one model."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], add_bos: bool, chat_template: str | None,
                 clean_up_spaces: bool = False) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))  # ordered, no duplicates
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._clean_up_spaces = clean_up_spaces

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """From a gguf.GGUFReader, its `fields`, or a dict of tokenizer.* keys -> plain values."""
        meta = _gguf_metadata(source)
        model = meta.get("model")
        if model not in _GGUF_BUILDERS:
            raise ModelLoadError(f"unsupported tokenizer model '{model}' in GGUF "
                                 f"(supported: {', '.join(_GGUF_BUILDERS)})")
        if "tokens" not in meta:
            raise ModelLoadError("GGUF has no tokenizer.ggml.tokens")
        backend = _GGUF_BUILDERS[model](meta)
        # every end-of-generation id llama.cpp knows: eos, end-of-turn, end-of-message
        eos = [meta[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if k in meta]
        # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
        add_bos = bool(meta.get("add_bos_token", model == "llama"))
        return cls(backend, bos_token_id=meta.get("bos_token_id"),
                   eos_token_ids=eos, add_bos=add_bos,
                   chat_template=meta.get("chat_template"))

    @classmethod
    def from_hf_folder(cls, path: str) -> Tokenizer:
        """From tokenizer.json + tokenizer_config.json (+ generation_config/config eos ids)."""
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise ModelLoadError(f"'{path}' has no tokenizer.json "
                                 "(only the fast-tokenizer format is supported)")
        try:
            backend = Backend.from_file(tok_path)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"cannot read {tok_path}: {err}") from None
        cfg_path = os.path.join(path, "tokenizer_config.json")
        tok_config = _json_file(cfg_path) if os.path.isfile(cfg_path) else {}
        bos_token_id = _hf_bos_id(backend, tok_config, _optional_json(path, "config.json"))
        add_bos = tok_config.get("add_bos_token")
        if add_bos is None:  # no flag: BOS comes from tokenizer.json's post-processor, if at all
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bool(probe) and probe[0] == bos_token_id
        return cls(backend, bos_token_id=bos_token_id, eos_token_ids=_hf_eos_ids(
                       backend, tok_config, path), add_bos=bool(add_bos),
                   chat_template=_hf_chat_template(path, tok_config),
                   clean_up_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        tokens = [self.backend.id_to_token(int(i)) for i in ids]
        if None in tokens:
            bad = next(i for i, t in zip(ids, tokens, strict=True) if t is None)
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary "
                                      f"(size {self.vocab_size})")
        return tokens

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the bytes of text one token stands for: the longest piece in the
        vocabulary (UTF-8), times 4 when a normalizer may shrink text before it is split (NFKC
        folds some 3-byte characters into fewer). A text of more than n times this has more
        than n tokens."""
        pieces = (self.backend.id_to_token(i) for i in range(self.vocab_size))
        longest = max((len(p.encode("utf-8", "surrogatepass")) for p in pieces if p), default=1)
        return longest * (4 if self.backend.normalizer is not None else 1)

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes: exact for byte-level vocabularies (a piece of a multi-byte
        character included), the UTF-8 of its text otherwise."""
        piece = self.convert_ids_to_tokens([token_id])[0]
        table = _alphabet_bytes()
        if piece and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
        return list(self.decode([token_id], skip_special_tokens=False).encode())

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Renders `messages` with the model's own template; one clear line on bad input."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template: send a plain prompt")
        eos_id = next(iter(self.eos_token_ids), None)
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id), eos_token=self._token_text(eos_id),
            **template_kwargs)

    def _token_text(self, token_id: int | None) -> str | None:
        return self.backend.id_to_token(token_id) if token_id is not None else None


def _optional_json(path: str, name: str) -> dict[str, Any]:
    full = os.path.join(path, name)
    return _json_file(full) if os.path.isfile(full) else {}


def _hf_bos_id(backend: Backend, tok_config: Mapping[str, Any],
               config: Mapping[str, Any]) -> int | None:
    bos = _token_content(tok_config.get("bos_token"))
    bos_id = backend.token_to_id(bos) if bos else None
    return bos_id if bos_id is not None else config.get("bos_token_id")


def _hf_eos_ids(backend: Backend, tok_config: Mapping[str, Any], path: str) -> list[int]:
    """Every id that ends generation: the tokenizer's eos, then generation_config's and config's."""
    eos = _token_content(tok_config.get("eos_token"))
    ids = [i for i in [backend.token_to_id(eos) if eos else None] if i is not None]
    for name in ("generation_config.json", "config.json"):
        ids += _as_ids(_optional_json(path, name).get("eos_token_id"))
    return ids


def _clean_up_spaces(text: str) -> str:
    """Hugging Face's clean_up_tokenization: drops the space before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text
