"""Automatic prefix caching on the embedded SmolLM2-135M-Instruct: a long shared system prompt and
a multi-turn chat, kvserve with prefix caching beside kvserve without it, in one run.

Prints a table for people and one JSON line last.

Methods (greedy, EOS ignored, float32, chat template applied):
  (a) shared system prompt: a --system-tokens (2,000) system message + one of --questions (32)
      short user questions. TTFT: the first question warms the cache, then the others go one at a
      time; TTFT = the engine's time from arrival to first token (out.metrics["ttft_s"]); median
      over questions 2..N with vs without caching.
  (b) throughput: all N questions submitted at once (max_num_seqs = N) to a fresh engine, wall
      time of generate(); tokens/s = N * --new-tokens / wall; hit rate from the engine's cache
      snapshot.
  (c) multi-turn chat of --turns (8) turns: each turn's prompt is the conversation so far through
      the chat template (the model's reply appended as the assistant message); prefill tokens
      computed = prompt tokens - num_cached_tokens, summed over turns, with vs without caching.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench_core import log, machine_info

from kvserve import LLM, SamplingParams

TOPICS = ["refund policies", "shipping times", "password resets", "invoice questions",
          "account deletion", "gift cards", "warranty claims", "order tracking"]
QUESTIONS = [f"Question {i + 1}: how do I handle {TOPICS[i % len(TOPICS)]} for order "
             f"#{1000 + 37 * i}?" for i in range(64)]
CHAT = ["Hi! I want to plan a small vegetable garden.", "What should I plant first?",
        "How often should I water it?", "What about pests?", "Which tools do I need?",
        "How do I prepare the soil?", "When do I harvest the tomatoes?",
        "Can you summarise the plan?", "Any tips for next year?", "Thanks, one last thing?"]


def system_prompt(llm: LLM, num_tokens: int) -> str:
    """A support-bot system message of about num_tokens tokens (numbered policy lines)."""
    lines, i = ["You are the support assistant of a small online shop. Follow these rules."], 0
    while len(llm.tokenizer.encode("\n".join(lines), add_special_tokens=False)) < num_tokens:
        i += 1
        lines.append(f"Rule {i}: for {TOPICS[i % len(TOPICS)]}, be precise, cite the order "
                     f"number, stay polite and never promise a date you cannot keep ({i}).")
    return "\n".join(lines)


def make_llm(caching: bool, max_num_seqs: int) -> LLM:
    return LLM(dtype="float32", enable_prefix_caching=caching, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=2048, seed=0)


def chat_ids(llm: LLM, system: str, question: str) -> dict:
    return {"prompt_token_ids": llm.encode_chat([{"role": "system", "content": system},
                                                 {"role": "user", "content": question}])}


def bench_ttft(caching: bool, system_tokens: int, questions: list[str], new_tokens: int) -> dict:
    llm = make_llm(caching, 1)
    system = system_prompt(llm, system_tokens)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(chat_ids(llm, "Be brief.", "Hi"), params, use_tqdm=False)  # warm-up
    ttfts, cached, texts = [], [], []
    for q in questions:
        out = llm.generate(chat_ids(llm, system, q), params, use_tqdm=False)[0]
        ttfts.append(out.metrics["ttft_s"])
        cached.append(out.num_cached_tokens)
        texts.append(list(out.token_ids))
    prompt_len = len(chat_ids(llm, system, questions[0])["prompt_token_ids"])
    return {"ttft_s": ttfts, "num_cached_tokens": cached, "tokens": texts,
            "prompt_tokens_first": prompt_len,
            "ttft_median_after_first_s": statistics.median(ttfts[1:])}


def bench_throughput(caching: bool, system_tokens: int, questions: list[str],
                     new_tokens: int) -> dict:
    llm = make_llm(caching, len(questions))
    system = system_prompt(llm, system_tokens)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(chat_ids(llm, "Be brief.", "Hi"), params, use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    prompts = [chat_ids(llm, system, q) for q in questions]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    prefix = llm.engine.cache_snapshot().prefix
    return {"wall_s": wall, "tokens_per_s": len(questions) * new_tokens / wall,
            "hit_rate": prefix.hit_rate if prefix is not None else 0.0,
            "hit_tokens": prefix.num_hit_tokens if prefix is not None else 0,
            "tokens": [list(o.token_ids) for o in outs]}


def bench_chat(caching: bool, turns: int, new_tokens: int) -> dict:
    llm = make_llm(caching, 1)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    messages = [{"role": "system", "content": "You are a friendly gardening assistant."}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": CHAT[turn % len(CHAT)]})
        ids = llm.encode_chat(messages)
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        rows.append({"prompt_tokens": len(ids), "cached_tokens": out.num_cached_tokens,
                     "prefill_tokens": len(ids) - out.num_cached_tokens,
                     "ttft_s": out.metrics["ttft_s"]})
        messages.append({"role": "assistant", "content": out.text})
    return {"turns": rows, "prefill_tokens": sum(r["prefill_tokens"] for r in rows),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system-tokens", type=int, default=2000)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--chat-new-tokens", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="200-token system prompt, 4 questions")
    args = p.parse_args()
    if args.quick:
        args.system_tokens, args.questions, args.turns, args.chat_new_tokens = 200, 4, 3, 16
    questions = QUESTIONS[:args.questions]
    res: dict = {}
    for caching in (True, False):
        name = "cached" if caching else "uncached"
        log(f"(a) TTFT, prefix caching {'on' if caching else 'off'} ...")
        ttft = bench_ttft(caching, args.system_tokens, questions, args.new_tokens)
        log(f"(b) throughput, prefix caching {'on' if caching else 'off'} ...")
        thr = bench_throughput(caching, args.system_tokens, questions, args.new_tokens)
        log(f"(c) multi-turn chat, prefix caching {'on' if caching else 'off'} ...")
        chat = bench_chat(caching, args.turns, args.chat_new_tokens)
        res[name] = {"ttft": ttft, "throughput": thr, "chat": chat}
    on, off = res["cached"], res["uncached"]
    same_ttft = on["ttft"].pop("tokens") == off["ttft"].pop("tokens")
    same_thr = on["throughput"].pop("tokens") == off["throughput"].pop("tokens")
    t_on, t_off = on["ttft"]["ttft_median_after_first_s"], off["ttft"]["ttft_median_after_first_s"]
    print(f"\nfloat32, system prompt {on['ttft']['prompt_tokens_first']} tokens with the first "
          f"question (chat template), {len(questions)} questions, {args.new_tokens} new tokens "
          "each, greedy\n")
    print(f"(a) TTFT of questions 2..{len(questions)}, one at a time (median):")
    print(f"    prefix caching on   {t_on * 1e3:9.1f} ms   (cached tokens per question: "
          f"{statistics.median(on['ttft']['num_cached_tokens'][1:]):.0f})")
    print(f"    prefix caching off  {t_off * 1e3:9.1f} ms")
    print(f"    TTFT {t_off / t_on:.1f}x lower with caching (target >= 10x); outputs identical: "
          f"{same_ttft}")
    b_on, b_off = on["throughput"], off["throughput"]
    print(f"\n(b) all {len(questions)} questions at once:")
    print(f"    prefix caching on   {b_on['wall_s']:7.2f} s  {b_on['tokens_per_s']:7.1f} tok/s  "
          f"hit rate {b_on['hit_rate']:.1%}")
    print(f"    prefix caching off  {b_off['wall_s']:7.2f} s  {b_off['tokens_per_s']:7.1f} tok/s")
    print(f"    throughput {b_on['tokens_per_s'] / b_off['tokens_per_s']:.1f}x with caching; "
          f"outputs identical: {same_thr}")
    c_on, c_off = on["chat"], off["chat"]
    print(f"\n(c) multi-turn chat, {args.turns} turns, {args.chat_new_tokens} new tokens a turn:")
    print(f"    {'turn':>4} {'prompt':>7} {'cached':>7} {'prefill on':>11} {'prefill off':>12} "
          f"{'TTFT on ms':>11} {'TTFT off ms':>12}")
    for i, (a, b) in enumerate(zip(c_on["turns"], c_off["turns"])):
        print(f"    {i + 1:>4} {a['prompt_tokens']:>7} {a['cached_tokens']:>7} "
              f"{a['prefill_tokens']:>11} {b['prefill_tokens']:>12} {a['ttft_s'] * 1e3:>11.1f} "
              f"{b['ttft_s'] * 1e3:>12.1f}")
    saved = c_off["prefill_tokens"] / c_on["prefill_tokens"]
    print(f"    prefill tokens computed: {c_on['prefill_tokens']} with caching vs "
          f"{c_off['prefill_tokens']} without ({saved:.1f}x fewer)\n")
    print(json.dumps({"bench": "prefix", "machine": machine_info(), "config": vars(args),
                      "ttft_ratio": t_off / t_on, "outputs_identical": same_ttft and same_thr,
                      **res}))


if __name__ == "__main__":
    main()
