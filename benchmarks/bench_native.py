"""kvserve multiplying the GGUF's weights as stored (--quantization gguf) beside kvserve on the
same weights dequantized to float32, llama.cpp on the same file, and transformers float32: batch-1
decode, a cold 2,000-token prefill, and decode at 2,000 tokens of context, in one process.

Methods (every engine gets the same token ids, encoded once by kvserve's tokenizer):
  decode      = (N - 1) / (time of the last token - time of the first), greedy, EOS ignored, a
                20-token prompt. kvserve: out.metrics["decode_tokens_per_s"]; llama.cpp: eval()
                one token at a time after the prompt, timed around each eval; transformers: a
                streamer stamps each token.
  prefill     = prompt tokens / time to the first token, cold: each run gets a prompt no run has
                seen (bench_core's windows); kvserve checks 0 cached tokens and K/V computed for
                every token; llama.cpp is reset() before each prompt (its cells are overwritten).
  ctx decode  = ms per token of the 64 tokens decoded after a fresh 2,000-token prompt, as
                decode's definition (the 63 steps after the first token); cold as prefill.
The engines stay loaded and are measured in turn, --rounds times (this machine's bandwidth
drifts: interleaving keeps a drift from favouring one engine); each figure is the median over the
rounds, each ratio the median of the per-round ratios. Run it alone: two threads on two cores.
Needs the `peers` extra (llama-cpp-python) for llama.cpp and transformers for its column;
--skip-llama / --skip-hf run without them.

    .venv/bin/python benchmarks/bench_native.py [--rounds 3] [--new-tokens 500] [--quick]
        [--model FILE.gguf] [--quantization gguf|int8|int4]

--model runs the same comparison on another GGUF (e.g. a k-quant file; transformers is then
skipped: its column needs the default model's Hugging Face twin); --quantization int8|int4 makes
the "native" column kvserve's own load-time quantization of the float weights instead of the
file's blocks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import bench_core
import numpy as np

from kvserve import LLM, SamplingParams
from kvserve.model.loader import default_model_path

CONTEXT = 2000
CTX_DECODE = 64
QUALITY_CHUNK = 64  # positions per forward in the perplexity run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--ppl-windows", type=int, default=20,
                   help="perplexity windows of 1,024 tokens of the shipped text (default 20)")
    p.add_argument("--model", default=None,
                   help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", default="gguf", choices=("gguf", "int8", "int4"),
                   help="the native column's --quantization (default gguf)")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 64 tokens, 256-token prompts, 1 perplexity window")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.ppl_windows = 1, 64, 1
    if args.model is not None:
        args.skip_hf = True
    args.context = 256 if args.quick else CONTEXT
    return args


class Kvserve:
    def __init__(self, label: str, **settings):
        self.label = label
        self.llm = LLM(seed=bench_core.SEED, **settings)

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        out = self.llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        return out.metrics["decode_tokens_per_s"], list(out.outputs[0].token_ids)

    def prefill(self, ids: list[int]) -> float:
        model = self.llm.engine.model
        before = model.num_kv_projections
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        out = self.llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        computed = (model.num_kv_projections - before) // self.llm.engine.spec.num_layers
        bench_core.check_cold(out.num_cached_tokens, f"{self.label} prefill")
        if computed != len(ids):
            raise SystemExit(f"bench_native: {self.label} computed K/V for {computed} of "
                             f"{len(ids)} prompt tokens")
        return len(ids) / out.metrics["ttft_s"]

    def context_decode(self, ids: list[int]) -> float:
        params = SamplingParams(max_tokens=CTX_DECODE, temperature=0, ignore_eos=True)
        out = self.llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        bench_core.check_cold(out.num_cached_tokens, f"{self.label} context decode")
        return 1e3 / out.metrics["decode_tokens_per_s"]

    def bytes_per_token(self) -> int:
        return self.llm.engine.model.num_weight_bytes_per_token()


class LlamaCpp:
    label = "llama.cpp"

    def __init__(self, n_ctx: int, path: str):
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(path, n_ctx=n_ctx, n_threads=2, n_threads_batch=2,
                         n_batch=512, seed=0, verbose=False)

    def _last_logits(self) -> np.ndarray:
        # without logits_all, llama-cpp-python 0.3 keeps no scores: read the context's own
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def _greedy(self, ids: list[int], n: int) -> tuple[list[int], list[float]]:
        self.llm.reset()
        self.llm.eval(ids)
        out, stamps = [], [time.perf_counter()]
        for i in range(n):
            out.append(int(np.argmax(self._last_logits())))
            if i < n - 1:
                self.llm.eval(out[-1:])
                stamps.append(time.perf_counter())
        return out, stamps

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        out, stamps = self._greedy(ids, n)
        return (n - 1) / (stamps[-1] - stamps[0]), out

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        dt = time.perf_counter() - t0
        if self.llm.n_tokens != len(ids):
            raise SystemExit(f"bench_native: llama.cpp evaluated {self.llm.n_tokens} of "
                             f"{len(ids)} tokens")
        return len(ids) / dt

    def context_decode(self, ids: list[int]) -> float:
        _, stamps = self._greedy(ids, CTX_DECODE)
        return (stamps[-1] - stamps[0]) / (CTX_DECODE - 1) * 1e3

    def bytes_per_token(self) -> int:
        from kvserve.model_files import open_gguf

        # every tensor of the file, read once per token (the tied embedding as the LM head)
        return sum(int(t.n_bytes) for t in open_gguf(self.path).tensors)


class Transformers:
    label = "transformers float32"

    def __init__(self):
        self.model = bench_core.load_hf("float32")

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        import torch

        clock = bench_core.TokenClock()
        x = torch.tensor([ids])
        pad = self.model.generation_config.eos_token_id
        pad = pad[0] if isinstance(pad, list) else pad
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                      do_sample=False, eos_token_id=None, pad_token_id=pad,
                                      streamer=clock)
        return (n - 1) / (clock.times[-1] - clock.times[0]), out[0, x.shape[1]:].tolist()

    def prefill(self, ids: list[int]) -> float:
        import torch

        x = torch.tensor([ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(x, logits_to_keep=1)
            return len(ids) / (time.perf_counter() - t0)

    def context_decode(self, ids: list[int]) -> float | None:
        return None  # not measured for transformers

    def bytes_per_token(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    decode_ids, prompts = bench_core.build_inputs(args.context, 4 * (2 * args.rounds + 1))
    fresh = iter(prompts)
    engines = [Kvserve("kvserve native", model=args.model, quantization=args.quantization),
               Kvserve("kvserve float32", model=args.model, quantization="none")]
    if not args.skip_llama:
        engines.append(LlamaCpp(args.context + CTX_DECODE + 8, args.model or default_model_path()))
    if not args.skip_hf:
        engines.append(Transformers())
    native = engines[0].llm.engine.model
    if not native.weights_as_stored:
        raise SystemExit(f"bench_native: --quantization {args.quantization} did not keep the "
                         "weights quantized")
    bench_core.log(f"kvserve native: {native.weights_description()}")
    for e in engines:  # warm-up: one of each measure
        e.decode(decode_ids, 16)
        e.prefill(next(fresh))
    rows: dict[str, dict[str, list]] = {e.label: {"decode": [], "prefill": [], "ctx": [],
                                                  "tokens": []} for e in engines}
    for r in range(args.rounds):
        for e in engines:
            tps, tokens = e.decode(decode_ids, args.new_tokens)
            row = rows[e.label]
            row["decode"].append(tps)
            row["tokens"] = tokens
            row["prefill"].append(e.prefill(next(fresh)))
            ctx = e.context_decode(next(fresh))
            if ctx is not None:
                row["ctx"].append(ctx)
            bench_core.log(f"round {r} {e.label:22s} decode {tps:6.1f} tok/s, prefill "
                           f"{row['prefill'][-1]:6.1f} tok/s, ctx decode "
                           f"{'-' if ctx is None else f'{ctx:.1f} ms'}")
    q = quality(engines[0], engines[1], args.ppl_windows) if args.ppl_windows else None
    report(engines, rows, args, q)


def quality(native: Kvserve, dense: Kvserve, windows: int) -> dict:
    """Perplexity of both kvserve models over `windows` windows of 1,024 tokens of the shipped
    public-domain text (after the KV guardrail's calibration tokens), fed QUALITY_CHUNK positions
    per forward (64 rows: the int16 panel GEMM that batched decode and short prefills use), plus
    the mean KL divergence of native's next-token distributions from float32's and top-1
    agreement."""
    import math

    import torch

    from kvserve.engine.kv_quality import CALIBRATION_TOKENS, Variant, corpus_text, log_probs
    from kvserve.kernels.cpu import MAX_M

    ids = native.llm.engine.tokenizer.encode(corpus_text())
    w = 1024
    if CALIBRATION_TOKENS + windows * w > len(ids):
        raise SystemExit(f"bench_native: the corpus has {len(ids):,} tokens; {windows} windows "
                         "do not fit")
    variant = Variant("float32", "float32")
    nll = {"native": 0.0, "float32": 0.0}
    kl = top1 = count = 0.0
    chunk = min(QUALITY_CHUNK, MAX_M)
    for i in range(windows):
        text = ids[CALIBRATION_TOKENS + i * w:CALIBRATION_TOKENS + (i + 1) * w]
        runs = (log_probs(native.llm.engine.model, variant, text, chunk_size=chunk),
                log_probs(dense.llm.engine.model, variant, text, chunk_size=chunk))
        start = 0
        for lp_native, lp_dense in zip(*runs):
            n = lp_native.shape[0]
            targets = torch.tensor(text[start + 1:start + n + 1], dtype=torch.long).unsqueeze(-1)
            m = targets.shape[0]
            a, b = lp_native[:m], lp_dense[:m]
            nll["native"] -= float(a.gather(-1, targets).sum())
            nll["float32"] -= float(b.gather(-1, targets).sum())
            kl += float((b.exp() * (b - a)).sum())
            top1 += float((a.argmax(-1) == b.argmax(-1)).sum())
            count += m
            start += n
        bench_core.log(f"perplexity window {i + 1}/{windows}")
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    if kl <= 0:
        raise SystemExit("bench_native: native's distributions equal float32's exactly: the "
                         "native kernels did not run")
    return {"predictions": int(count), "perplexity": ppl,
            "perplexity_change": ppl["native"] / ppl["float32"] - 1, "mean_kl": kl / count,
            "top1_agreement": top1 / count, "chunk": chunk}


def ratio(rows, a: str, b: str, key: str, invert: bool = False) -> float | None:
    if not rows[a][key] or not rows[b][key]:
        return None
    pairs = zip(rows[a][key], rows[b][key])
    return statistics.median((y / x) if invert else (x / y) for x, y in pairs)


def report(engines, rows, args, q: dict | None) -> None:
    model = args.model or "the embedded SmolLM2-135M-Instruct (Q4_1/Q8_0)"
    print(f"\nbench_native: {model}, native = --quantization {args.quantization}: "
          f"{engines[0].llm.engine.model.weights_description()}")
    print(f"{args.rounds} rounds; decode {args.new_tokens} tokens at batch 1, "
          f"prefill and decode after {args.context:,} tokens (medians over rounds)\n")
    print(f"{'engine':24s} {'MB/token':>9s} {'decode tok/s':>13s} {'prefill tok/s':>14s} "
          f"{'ctx ms/token':>13s} {'greedy = native':>16s}")
    native_tokens = rows["kvserve native"]["tokens"]
    summary = {}
    for e in engines:
        row = rows[e.label]
        med = {k: statistics.median(row[k]) if row[k] else None
               for k in ("decode", "prefill", "ctx")}
        agree = bench_core.leading_agreement(row["tokens"], native_tokens)
        ctx = "-" if med["ctx"] is None else f"{med['ctx']:.1f}"
        print(f"{e.label:24s} {e.bytes_per_token() / 1e6:9.1f} {med['decode']:13.1f} "
              f"{med['prefill']:14.1f} {ctx:>13s} {agree:>12d}/{len(native_tokens)}")
        summary[e.label] = {**{k: v for k, v in med.items()}, "per_round": {
            k: row[k] for k in ("decode", "prefill", "ctx")},
            "weight_bytes_per_token": e.bytes_per_token(), "greedy_agreement_with_native": agree}
    ratios = {}
    for other in [e.label for e in engines if e.label != "kvserve native"]:
        ratios[other] = {
            "decode": ratio(rows, "kvserve native", other, "decode"),
            "prefill": ratio(rows, "kvserve native", other, "prefill"),
            "ctx_speed": ratio(rows, "kvserve native", other, "ctx", invert=True)}
        r = ratios[other]
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        print(f"native vs {other}: decode {fmt(r['decode'])}, prefill {fmt(r['prefill'])}, "
              f"decode at {args.context:,} context {fmt(r['ctx_speed'])} (per-round medians)")
    if q is not None:
        print(f"quality over {q['predictions']:,} predictions ({q['chunk']} positions per "
              f"forward): perplexity native {q['perplexity']['native']:.4f}, float32 "
              f"{q['perplexity']['float32']:.4f} ({100 * q['perplexity_change']:+.3f}%), mean KL "
              f"{q['mean_kl']:.2e}, top-1 agreement {100 * q['top1_agreement']:.2f}%")
    print(json.dumps({"model": args.model, "quantization": args.quantization,
                      "rounds": args.rounds, "new_tokens": args.new_tokens,
                      "context": args.context, "engines": summary, "native_ratios": ratios,
                      "quality": q}))


if __name__ == "__main__":
    sys.exit(main())
