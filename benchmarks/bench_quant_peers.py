"""What the peers' quantized KV caches do to quality, on the model, text and prompts of kvserve's
quant lab (`kvserve bench quant`), so kvserve's rows can be set beside theirs.

Prints a table for people and one JSON line last. Each peer is compared with its own reference
cache only: the peers' numerics differ from kvserve's and from each other's (llama.cpp runs the
Q4_1 weights in its own kernels; transformers dequantizes them to float32), so their absolute
perplexities differ a little and the changes are what compare.

Peers (same GGUF file as kvserve: the embedded SmolLM2-135M-Instruct):
  llama.cpp     llama-cpp-python, n_threads=2, K and V both of one type: f16 (the reference),
                q8_0, q4_0, all with flash_attn=True (quantized V needs it, so the reference
                runs the same kernel), and a control row: f16 with flash_attn off, llama.cpp's
                other attention kernel on the same f16 cache, which shows how far two of its f16
                paths alone move the predictions. n_batch 512: llama.cpp writes a batch's K/V
                to the cache before attention reads it, so every position attends over the
                stored (quantized) K/V.
                Premise check: llama.cpp's own log must say K (type) and V (type) at the size
                that type's ggml blocks give for the cells and layers it reports, and flash_attn
                as asked; its tokenizer must encode the corpus to kvserve's ids.
  transformers  the same GGUF loaded with transformers' GGUF support, float32 weights; reference
                DynamicCache; QuantizedCache (q_group_size 64, residual_length 128 by default:
                the newest < 128 tokens stay float32, the rest are stored quantized and all
                re-quantized each time the residual fills) for each backend that is installed:
                quanto int4 and int2 (its default axis 0: with head_dim 64, a scale and a zero
                point per token per KV head), hqq int4 with axis 1 (transformers' advice for
                hqq; the same grouping, the scale and zero point optimized by hqq), and the
                built-in fp8 backend (e4m3, one scale per tensor fixed on its first write).
                Premise check: every layer of a quantized cache holds quantized K/V after each
                window and each generation, it holds fewer bytes than the reference, its
                predictions differ from the reference's; the GGUF tokenizer transformers builds
                must encode the corpus to kvserve's ids. A backend that is not installed gets a
                row saying so. Prompts are generated one at a time (batch 1), as separate requests:
                the fp8 backend's one scale per tensor would otherwise span prompts.

Data (what kvserve's quant lab uses): the shipped text (kvserve.engine.kv_quality.corpus_text)
encoded by kvserve's tokenizer; the first 1024 tokens skipped (the guardrail's calibration text);
then --windows windows of 1024 tokens; then --prompts prompts of 1024 tokens.

Measures, per peer and cache:
  perplexity  exp(mean NLL) over every position of every window but the window's last (which
              predicts nothing in it); each window its own sequence from position 0 in a fresh
              cache. llama.cpp: logits_all=True, eval(window). transformers: the window fed in
              chunks of 128 tokens through the cache, so later chunks attend to the earlier
              chunks' cached (quantized) K/V.
  ppl +%      perplexity / the reference cache's perplexity - 1.
  mean KL     mean over those positions of KL(reference || quantized) of the next-token
              distributions; top-1: the share of positions whose argmax equals the reference's.
  greedy/128  per prompt, the generated tokens equal to the reference's before the first
              difference, of --new-tokens generated greedily (argmax, EOS ignored), shown per 128
              tokens (128 * agree / N): the mean and the minimum over prompts.
  B/token     KV bytes held per token: llama.cpp from its log (checked against the ggml block
              sizes); transformers measured from the cache's tensors after a window (1024 tokens;
              by then the residual has just been flushed into the quantized part).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_core import load_hf, log, machine_info

from kvserve.model_files import default_model_path

CALIBRATION_TOKENS = 1024  # kvserve's guardrail text, skipped (as the quant lab does)
WINDOW_TOKENS = 1024  # the quant lab's --window-tokens default
PROMPT_TOKENS = 1024  # the quant lab's --prompt-tokens default
HF_CHUNK = 128  # tokens per transformers forward in the perplexity windows
LOGPROB_ROWS = 256  # rows of llama.cpp's [window, vocab] logits turned into log-probs at a time
PEERS = ("llama.cpp", "transformers")

# llama.cpp KV types: GGML type id, and (bytes, values) of one ggml block of it
GGML_TYPES = {"f16": (1, 2, 1), "q8_0": (8, 34, 32), "q4_0": (2, 18, 32)}
# llama.cpp rows: label -> (K and V type, flash_attn); the first is the reference
FA_OFF = "f16, flash_attn off"  # a control: the same cache through llama.cpp's other kernel
LLAMA_CONFIGS = {
    "f16": ("f16", True),
    FA_OFF: ("f16", False),
    "q8_0": ("q8_0", True),
    "q4_0": ("q4_0", True),
}
# transformers rows: label -> (package the backend needs or None, QuantizedCache arguments);
# transformers' defaults but for hqq's axes, 1 as transformers recommends for that backend
HF_CACHES = {
    "quanto int4": ("optimum-quanto", {"backend": "quanto", "nbits": 4}),
    "quanto int2": ("optimum-quanto", {"backend": "quanto", "nbits": 2}),
    "hqq int4 (axis 1)": ("hqq", {"backend": "hqq", "nbits": 4, "axis_key": 1,
                                  "axis_value": 1}),
    "fp8 e4m3 per-tensor": (None, {"backend": "fp8"}),
}


@dataclass
class Row:
    peer: str
    label: str
    reference: bool = False
    kv_bytes_per_token: float | None = None
    perplexity: float | None = None
    perplexity_change: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    greedy_agreement_per_128: float | None = None
    greedy_agreement_min_per_128: float | None = None
    error: str | None = None  # a row that could not run: why


class PremiseError(RuntimeError):
    """A peer did not do what the measurement assumes."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16,
                   help=f"perplexity windows of {WINDOW_TOKENS} tokens (default 16)")
    p.add_argument("--prompts", type=int, default=10,
                   help=f"greedy prompts of {PROMPT_TOKENS} tokens (default 10)")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="greedy tokens generated per prompt (default 256)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated, of {', '.join(PEERS)} (default both)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke run: 1 window, 2 prompts, 16 new tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.prompts, args.new_tokens = 1, 2, 16
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown or not args.peers:
        p.error(f"--peers: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(PEERS)}")
    if min(args.windows, args.prompts, args.new_tokens) < 1:
        p.error("--windows, --prompts and --new-tokens must be at least 1")
    return args


# -- data: what kvserve's quant lab measures on --------------------------------------------------
def corpus() -> str:
    try:
        from kvserve.engine.kv_quality import corpus_text
    except ImportError:  # renamed: read the shipped file itself
        return (Path(__file__).resolve().parents[1] / "kvserve" / "data" /
                "moby_dick.txt").read_text(encoding="utf-8")
    return corpus_text()


def build_inputs(args) -> tuple[str, list[int], list[list[int]], list[list[int]]]:
    """(text, its token ids, perplexity windows, greedy prompts), sliced by kvserve's quant lab
    itself (kvserve/bench/quant_lab.py, corpus_slices): the same positions as its table."""
    from argparse import Namespace

    from kvserve.bench.quant_lab import corpus_slices
    from kvserve.errors import ConfigError
    from kvserve.model.loader import load_checkpoint

    shape = Namespace(windows=args.windows, window_tokens=WINDOW_TOKENS, prompts=args.prompts,
                      prompt_tokens=PROMPT_TOKENS)
    try:
        windows, prompts, ids = corpus_slices(load_checkpoint(None).tokenizer, shape)
    except ConfigError as err:
        raise SystemExit(f"bench_quant_peers: {err}") from None
    return corpus(), ids, windows, prompts


# -- shared measurement ------------------------------------------------------------------------
LogProbRun = Callable[[list[int]], Iterator[torch.Tensor]]


def compare(windows: list[list[int]], runs: dict[str, LogProbRun], progress) -> dict[str, dict]:
    """Each window through every run in lockstep (a run yields [rows, vocab] log-probs of the
    window's positions in order); the first run is the reference. Per label: perplexity, mean KL
    vs the reference, top-1 agreement with it, over every position but each window's last."""
    labels = list(runs)
    sums = {label: [0.0, 0.0, 0.0] for label in labels}  # nll, kl, top-1 agreement
    count = 0
    for ids in windows:
        start = 0
        for chunks in zip(*(runs[label](ids) for label in labels)):
            n = chunks[0].shape[0]
            targets = torch.tensor(ids[start + 1:start + n + 1], dtype=torch.long).unsqueeze(-1)
            m = targets.shape[0]  # the window's last position has no next token
            ref = chunks[0][:m]
            p_ref, top_ref = ref.exp(), ref.argmax(-1)
            for label, lp in zip(labels, chunks):
                lp = lp[:m]
                acc = sums[label]
                acc[0] -= float(lp.gather(-1, targets).sum())
                acc[1] += float((p_ref * (ref - lp)).sum())
                acc[2] += float((top_ref == lp.argmax(-1)).sum())
            count += m
            start += n
            progress(n)
        if start != len(ids):
            raise PremiseError(f"log-probs for {start} of a window's {len(ids)} positions")
    return {label: {"perplexity": math.exp(s[0] / count), "mean_kl": s[1] / count,
                    "top1_agreement": s[2] / count, "predictions": count}
            for label, s in sums.items()}


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> list[int]:
    """Per prompt: generated tokens equal to the reference's before the first difference."""
    out = []
    for got, want in zip(tokens, reference, strict=True):
        n = 0
        while n < min(len(got), len(want)) and got[n] == want[n]:
            n += 1
        out.append(n)
    return out


def fill_rows(rows: list[Row], quality: dict[str, dict], greedy: dict[str, list[list[int]]],
              new_tokens: int) -> None:
    ref_row = rows[0]
    ref_ppl = quality[ref_row.label]["perplexity"]
    for row in rows:
        q = quality[row.label]
        row.perplexity, row.mean_kl = q["perplexity"], q["mean_kl"]
        row.top1_agreement = q["top1_agreement"]
        row.perplexity_change = row.perplexity / ref_ppl - 1
        agree = agreement(greedy[row.label], greedy[ref_row.label])
        row.greedy_agreement_per_128 = 128 * statistics.mean(agree) / new_tokens
        row.greedy_agreement_min_per_128 = 128 * min(agree) / new_tokens
        if not row.reference and row.mean_kl <= 0:
            raise PremiseError(f"{row.peer} {row.label}: predictions identical to the reference's"
                               " (mean KL 0): the cache was not quantized")


class Progress:
    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.t0 = what, total, 0, time.perf_counter()
        self.last = self.t0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last > 30 or self.done >= self.total:
            self.last = now
            log(f"  {self.what}: {self.done:,}/{self.total:,} ({now - self.t0:.0f} s)")


def check_tokenizer(peer: str, encode: Callable[[str], list[int]], text: str,
                    ids: list[int]) -> None:
    got = encode(text)
    if got != ids:
        first = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got),
                                                                                  len(ids)))
        raise PremiseError(f"{peer}'s tokenizer encodes the corpus to {len(got):,} ids, kvserve's"
                           f" to {len(ids):,}, first difference at {first}: the ids would not "
                           "mean the same tokens")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- llama.cpp -----------------------------------------------------------------------------------
@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Everything written to file descriptor 2 (llama.cpp's log) in the block, as out[0]."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out.append(f.read().decode("utf-8", "replace"))


KV_LOG = re.compile(r"size = +[\d.]+ MiB \( *(\d+) cells, +(\d+) layers.*?K \((\w+)\): +([\d.]+)"
                    r" MiB, V \((\w+)\): +([\d.]+) MiB")


def open_llama(kv_type: str, flash_attn: bool, n_ctx: int):
    """A llama.cpp context with K and V of kv_type; fails loudly unless its log shows that type
    at that type's size and flash attention as asked. Returns (Llama, KV bytes per token)."""
    from llama_cpp import Llama

    type_id, block_bytes, block_values = GGML_TYPES[kv_type]
    with captured_stderr() as text:
        llm = Llama(default_model_path(), n_ctx=n_ctx, n_threads=2, n_threads_batch=2,
                    logits_all=True, flash_attn=flash_attn, type_k=type_id, type_v=type_id,
                    seed=0, verbose=True)
    text = text[0]
    llama_log_verbosity(False)
    found = KV_LOG.search(text)
    if found is None:
        raise PremiseError(f"llama.cpp {kv_type}: no KV cache size line in its log:\n"
                           f"{text[-2000:]}")
    cells, layers, k_type, k_mib, v_type, v_mib = found.groups()
    cells, layers, k_mib, v_mib = int(cells), int(layers), float(k_mib), float(v_mib)
    if (k_type, v_type) != (kv_type, kv_type):
        raise PremiseError(f"llama.cpp was asked for {kv_type} K/V and made K {k_type}, "
                           f"V {v_type}")
    if not re.search(rf"flash_attn += {int(flash_attn)}\n", text):
        raise PremiseError(f"llama.cpp {kv_type}: its log does not say flash_attn = "
                           f"{int(flash_attn)}")
    meta = llm.metadata
    arch = meta["general.architecture"]
    n_head, n_head_kv = int(meta[f"{arch}.attention.head_count"]), \
        int(meta[f"{arch}.attention.head_count_kv"])
    head_dim = int(meta.get(f"{arch}.attention.key_length",
                            int(meta[f"{arch}.embedding_length"]) // n_head))
    values = layers * n_head_kv * head_dim  # of K (and of V) per token
    want_mib = cells * values / block_values * block_bytes / 2**20
    if abs(k_mib - want_mib) > 0.006 or abs(v_mib - want_mib) > 0.006:
        raise PremiseError(f"llama.cpp {kv_type}: log says K {k_mib} MiB, V {v_mib} MiB for "
                           f"{cells} cells; {kv_type} blocks give {want_mib:.3f} MiB each")
    if cells < n_ctx:
        raise PremiseError(f"llama.cpp made {cells} KV cells, {n_ctx} needed")
    return llm, 2 * values * block_bytes / block_values


def llama_log_verbosity(verbose: bool) -> None:
    from llama_cpp._logger import set_verbose

    set_verbose(verbose)


def llama_run(llm) -> LogProbRun:
    def run(ids: list[int]) -> Iterator[torch.Tensor]:
        llm.reset()  # a fresh sequence from position 0 (eval drops cached cells past n_tokens)
        llm.eval(ids)
        if llm.n_tokens != len(ids):
            raise PremiseError(f"llama.cpp evaluated {llm.n_tokens} of {len(ids)} tokens")
        for s in range(0, len(ids), LOGPROB_ROWS):
            rows = torch.from_numpy(llm.scores[s:min(s + LOGPROB_ROWS, len(ids))])
            yield rows.float().log_softmax(dim=-1)
    return run


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for i in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        if i < n - 1:
            llm.eval(out[-1:])
    return out


def bench_llama(text: str, ids: list[int], windows, prompts, args) -> tuple[dict, list[Row]]:
    try:
        import llama_cpp
    except ImportError as err:
        return {}, [Row("llama.cpp", "-", error=f"not installed: {err} (pip install "
                                                "'kvserve[peers]')")]
    info = {"version": llama_cpp.__version__, "n_threads": 2, "n_batch": 512,
            "configs": {label: {"kv_type": t, "flash_attn": fa}
                        for label, (t, fa) in LLAMA_CONFIGS.items()}}
    n_ctx = max(WINDOW_TOKENS, PROMPT_TOKENS + args.new_tokens)
    llms, rows = {}, []
    for label, (kv_type, flash_attn) in LLAMA_CONFIGS.items():
        log(f"llama.cpp: open a context: {label} ...")
        llms[label], bytes_per_token = open_llama(kv_type, flash_attn, n_ctx)
        rows.append(Row("llama.cpp", label, reference=not rows,
                        kv_bytes_per_token=bytes_per_token))
    ref = next(iter(llms.values()))
    check_tokenizer("llama.cpp", lambda t: ref.tokenize(t.encode("utf-8"), add_bos=False,
                                                        special=False), text, ids)
    progress = Progress("llama.cpp perplexity positions",
                        len(windows) * WINDOW_TOKENS)
    quality = compare(windows, {t: llama_run(llm) for t, llm in llms.items()}, progress)
    greedy = {}
    for label, llm in llms.items():
        log(f"llama.cpp {label}: greedy, {len(prompts)} prompts x {args.new_tokens} tokens ...")
        greedy[label] = [llama_greedy(llm, p, args.new_tokens) for p in prompts]
    fill_rows(rows, quality, greedy, args.new_tokens)
    for llm in llms.values():
        llm.close()
    return info, rows


# -- transformers --------------------------------------------------------------------------------
def held_bytes(obj) -> int:
    """Bytes of the tensors in obj (tensor subclasses such as quanto's by their inner tensors;
    tuples, lists and dicts by their items)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(held_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(o) for o in obj.values())
    return 0


def cache_bytes(cache) -> int:
    return sum(held_bytes([layer.keys, layer.values, getattr(layer, "_quantized_keys", None),
                           getattr(layer, "_quantized_values", None)]) for layer in cache.layers)


def check_hf_cache(label: str, cache, quantized: bool, num_tokens: int) -> None:
    if cache.get_seq_length() != num_tokens:
        raise PremiseError(f"transformers {label}: the cache holds {cache.get_seq_length()} "
                           f"tokens, {num_tokens} were fed")
    held = [getattr(layer, "_quantized_keys", None) is not None
            and getattr(layer, "_quantized_values", None) is not None for layer in cache.layers]
    if quantized and not all(held):
        raise PremiseError(f"transformers {label}: {held.count(False)} of {len(held)} layers hold"
                           " no quantized K/V")


def hf_cache_factory(model, label: str) -> Callable[[], object]:
    """A function making a fresh cache; raises ImportError/ValueError if the backend is missing."""
    from transformers import DynamicCache, QuantizedCache

    if label == "DynamicCache":
        return lambda: DynamicCache(config=model.config)
    kwargs = HF_CACHES[label][1]

    def make():
        return QuantizedCache(config=model.config, **kwargs)

    make()  # a quantized layer's __init__ raises ImportError when its backend is missing
    return make


def cache_kwarg(model) -> str:
    """The name forward() takes the cache by: `cache` from transformers 5.x, `past_key_values`
    before (and deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def hf_run(model, label: str, make_cache, held: dict) -> LogProbRun:
    quantized = label != "DynamicCache"

    def run(ids: list[int]) -> Iterator[torch.Tensor]:
        cache = make_cache()
        for s in range(0, len(ids), HF_CHUNK):
            x = torch.tensor([ids[s:s + HF_CHUNK]])
            with torch.inference_mode():
                logits = model(input_ids=x, use_cache=True, **{cache_kwarg(model): cache}).logits
            if s + HF_CHUNK >= len(ids):  # checked before the last yield: zip stops after it
                check_hf_cache(label, cache, quantized, len(ids))
                held[label] = cache_bytes(cache) / len(ids)
            yield logits[0].float().log_softmax(dim=-1)
    return run


def hf_greedy(model, make_cache, label: str, prompt: list[int], n: int) -> list[int]:
    cache = make_cache()
    x = torch.tensor([prompt])
    out: list[int] = []
    with torch.inference_mode():
        for i in range(n):
            logits = model(input_ids=x, use_cache=True, logits_to_keep=1,
                           **{cache_kwarg(model): cache}).logits
            out.append(int(logits[0, -1].argmax()))
            if i < n - 1:
                x = torch.tensor([out[-1:]])
    check_hf_cache(label, cache, label != "DynamicCache", len(prompt) + n - 1)
    return out


def bench_hf(text: str, ids: list[int], windows, prompts, args) -> tuple[dict, list[Row]]:
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError as err:
        return {}, [Row("transformers", "-", error=f"not installed: {err}")]
    info = {"version": transformers.__version__, "dtype": "float32", "chunk": HF_CHUNK,
            "reference": "DynamicCache", "torch_threads": torch.get_num_threads(),
            "backends": {"optimum-quanto": version("optimum-quanto"), "hqq": version("hqq")},
            "configs": {label: kwargs for label, (_, kwargs) in HF_CACHES.items()}}
    log("transformers: load the GGUF (float32) ...")
    model = load_hf("float32")
    path = default_model_path()
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                            gguf_file=os.path.basename(path))
    check_tokenizer("transformers", lambda t: tok(t, add_special_tokens=True)["input_ids"],
                    text, ids)
    rows = [Row("transformers", "DynamicCache", reference=True)]
    makers = {"DynamicCache": hf_cache_factory(model, "DynamicCache")}
    skipped = []
    for label, (package, _) in HF_CACHES.items():
        try:
            makers[label] = hf_cache_factory(model, label)
        except (ImportError, ValueError) as err:  # transformers raises ImportError
            why = f"not installed: {package}" if package else str(err).splitlines()[0]
            skipped.append(Row("transformers", label, error=why))
            log(f"transformers {label}: {why}: {err}")
            continue
        rows.append(Row("transformers", label))
    held: dict[str, float] = {}
    progress = Progress("transformers perplexity positions",
                        len(windows) * WINDOW_TOKENS)
    quality = compare(windows, {label: hf_run(model, label, make, held)
                                for label, make in makers.items()}, progress)
    greedy = {}
    for label, make in makers.items():
        log(f"transformers {label}: greedy, {len(prompts)} prompts x {args.new_tokens} tokens ...")
        greedy[label] = [hf_greedy(model, make, label, p, args.new_tokens) for p in prompts]
    fill_rows(rows, quality, greedy, args.new_tokens)
    for row in rows:
        row.kv_bytes_per_token = held[row.label]
        if not row.reference and row.kv_bytes_per_token >= rows[0].kv_bytes_per_token:
            raise PremiseError(f"transformers {row.label} holds {row.kv_bytes_per_token:,.0f} "
                               f"B/token, the reference {rows[0].kv_bytes_per_token:,.0f}")
    return info, rows + skipped


# -- report --------------------------------------------------------------------------------------
def print_table(rows: list[Row], peers: dict, config: dict) -> None:
    print(f"\nPeers' quantized KV caches on SmolLM2-135M-Instruct (kvserve's GGUF): perplexity "
          f"over {config['perplexity_predictions']:,} predictions ({config['windows']} windows of "
          f"{config['window_tokens']} tokens after {config['calibration_tokens']}), greedy over "
          f"{config['prompts']} prompts x {config['new_tokens']} tokens; each peer against its own"
          " reference cache (marked *)")
    print("; ".join(f"{name} {info.get('version', '-')}" for name, info in peers.items()) + "\n")
    head = (f"{'peer':<13} {'KV cache':<22} {'B/token':>8} {'ppl':>8} {'ppl +%':>7} "
            f"{'mean KL':>8} {'top-1':>7} {'greedy/128':>10} {'min/128':>7}")
    print(head)
    print("-" * len(head))

    def cell(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in rows:
        label = r.label + (" *" if r.reference else "")
        if r.error:
            print(f"{r.peer:<13} {label:<22} {r.error}")
            continue
        print(f"{r.peer:<13} {label:<22} {cell(r.kv_bytes_per_token, ',.0f'):>8} "
              f"{cell(r.perplexity, '.3f'):>8} {cell(100 * r.perplexity_change, '+.2f'):>7} "
              f"{cell(r.mean_kl, '.5f'):>8} {cell(r.top1_agreement, '.2%'):>7} "
              f"{cell(r.greedy_agreement_per_128, '.1f'):>10} "
              f"{cell(r.greedy_agreement_min_per_128, '.1f'):>7}")
    if any(r.label == FA_OFF and not r.error for r in rows):
        print(f"\n{FA_OFF}: llama.cpp's f16 cache through its other attention kernel (a "
              "control: its numerical noise between two f16 paths, no quantization)")
    print()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    machine = machine_info()
    log("tokenize the corpus with kvserve's tokenizer ...")
    text, ids, windows, prompts = build_inputs(args)
    rows: list[Row] = []
    peers: dict[str, dict] = {}
    for name in args.peers:
        bench = {"llama.cpp": bench_llama, "transformers": bench_hf}[name]
        t = time.perf_counter()
        info, peer_rows = bench(text, ids, windows, prompts, args)
        info["wall_s"] = round(time.perf_counter() - t, 1)
        peers[name] = info
        rows += peer_rows
        log(f"{name}: done in {info['wall_s']:.0f} s")
    config = {"windows": args.windows, "window_tokens": WINDOW_TOKENS,
              "calibration_tokens": CALIBRATION_TOKENS, "prompts": args.prompts,
              "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens,
              "perplexity_predictions": args.windows * (WINDOW_TOKENS - 1),
              "corpus_tokens": len(ids), "quick": args.quick}
    print_table(rows, peers, config)
    print(json.dumps({"bench": "quant_peers", "machine": machine, "config": config,
                      "peers": peers, "wall_s": round(time.perf_counter() - t0, 1),
                      "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
