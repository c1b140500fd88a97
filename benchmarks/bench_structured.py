"""Structured outputs' cost: decode tokens/s with and without a JSON schema on the embedded
SmolLM2-135M-Instruct, in one run, interleaved.

Prints a table for people and one JSON line last.

Method (greedy, the model's default native weights, chat template applied): the same prompt and
the same number of generated tokens with and without the constraint. The schema is an array of at
least --items (40) small objects (a name, an age with bounds, an enum), so the grammar is in a
different state at every token (keys, strings, numbers, enums) and the text runs long enough to
time; the free run ignores EOS and is cut at the constrained run's token count. Premises checked
(the run fails loudly otherwise): the constrained text parses and validates against the schema;
the free text does not parse as that JSON; both runs generated the same number of tokens; no
prefix-cache hit (prefix caching off). Batch 1 and batch --batch (8) concurrent requests; decode
tokens/s from the engine's per-request metrics (first token to last), median of --rounds after a
warm-up; also the mask's own time per token (the grammar's mask and advance, timed around the
matcher calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench_core import log, machine_info

from kvserve import LLM, SamplingParams, StructuredOutputs


def schema(items: int) -> dict:
    person = {"type": "object", "additionalProperties": False,
              "required": ["name", "age", "team"],
              "properties": {"name": {"type": "string", "maxLength": 16},
                             "age": {"type": "integer", "minimum": 18, "maximum": 99},
                             "team": {"enum": ["red", "green", "blue", "yellow"]}}}
    return {"type": "array", "items": person, "minItems": items, "maxItems": items}


def run(llm: LLM, prompt: list[int], batch: int, params: SamplingParams) -> tuple[float, list]:
    outs = llm.generate([{"prompt_token_ids": prompt}] * batch, params, use_tqdm=False)
    rates = [o.metrics["decode_tokens_per_s"] for o in outs]
    for o in outs:
        if o.num_cached_tokens:
            raise RuntimeError("a prefix-cache hit: the runs must compute every prompt")
    return statistics.median(rates), [o.outputs[0] for o in outs]


class MaskTimer:
    """Wraps the engine's grammar matchers to time their mask and advance calls."""

    def __init__(self, llm: LLM):
        self.seconds, self.calls = 0.0, 0
        from kvserve import structured

        grammar = structured.Grammar
        timer = self

        class Timed(grammar):
            def allowed_bits(self):
                t0 = time.perf_counter()
                try:
                    return super().allowed_bits()
                finally:
                    timer.seconds += time.perf_counter() - t0
                    timer.calls += 1

            def consume(self, token_id):
                t0 = time.perf_counter()
                try:
                    super().consume(token_id)
                finally:
                    timer.seconds += time.perf_counter() - t0

        structured.Grammar = Timed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import jsonschema

    llm = LLM(enable_prefix_caching=False, max_num_seqs=args.batch, seed=0)
    timer = MaskTimer(llm)
    prompt = llm.encode_chat([{"role": "user", "content": f"List {args.items} people with a "
                                                          "name, an age and a team, as JSON."}])
    spec = StructuredOutputs(json=schema(args.items))
    constrained = SamplingParams(max_tokens=2000, temperature=0.0, structured_outputs=spec)
    _, (first, *_) = run(llm, prompt, 1, constrained)  # the warm-up, and the token count
    jsonschema.validate(json.loads(first.text), schema(args.items))
    if first.finish_reason != "stop":
        raise RuntimeError(f"the constrained run did not finish its JSON: {first.finish_reason}")
    n = len(first.token_ids)
    free = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    results = {}
    for batch in (1, args.batch):
        rates = {"free": [], "json": []}
        for _ in range(args.rounds):
            for name, params in (("free", free), ("json", constrained)):
                timer.seconds, timer.calls = 0.0, 0
                rate, outs = run(llm, prompt, batch, params)
                if any(len(o.token_ids) != n for o in outs):
                    raise RuntimeError(f"{name}: {[len(o.token_ids) for o in outs]} tokens, "
                                       f"not {n} each")
                if name == "json":
                    for o in outs:
                        jsonschema.validate(json.loads(o.text), schema(args.items))
                    mask_us = 1e6 * timer.seconds / max(1, timer.calls)
                else:
                    try:
                        jsonschema.validate(json.loads(outs[0].text), schema(args.items))
                        raise RuntimeError("the free run gave the schema's JSON: no contrast")
                    except (ValueError, jsonschema.ValidationError):
                        pass
                rates[name].append(rate)
                log(f"batch {batch} {name}: {rate:.1f} tokens/s per request")
        free_rate, json_rate = statistics.median(rates["free"]), statistics.median(rates["json"])
        results[batch] = dict(free_tokens_per_s=free_rate, json_tokens_per_s=json_rate,
                              overhead=1 - json_rate / free_rate, mask_us_per_token=mask_us)
    print(f"{'batch':>5} {'free tok/s':>11} {'JSON tok/s':>11} {'overhead':>9} {'mask us/tok':>12}")
    for batch, r in results.items():
        print(f"{batch:>5} {r['free_tokens_per_s']:>11.1f} {r['json_tokens_per_s']:>11.1f} "
              f"{100 * r['overhead']:>8.1f}% {r['mask_us_per_token']:>12.1f}")
    print(json.dumps({"bench": "structured", "tokens": n, "items": args.items,
                      "results": results, "machine": machine_info()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
