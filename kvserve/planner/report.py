"""The planner's answer as text for people: the arithmetic shown, the dtypes side by side, the
common mistake explained, and what would fit when the numbers do not. No torch."""

from __future__ import annotations

from kvserve.config import format_bytes as human
from kvserve.kv_dtypes import split_kv_dtype
from kvserve.kvcache.layout import kv_format, short_kv_dtype
from kvserve.planner.capacity import CapacityPlan, gib
from kvserve.planner.simulate import SimulationResult, StepCost, Workload


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _shape_line(p: CapacityPlan) -> str:
    m = p.model
    group = (f", {m.num_heads // m.num_kv_heads} query heads share each"
             if m.attention_kind == "GQA" else "")
    experts = f", {m.num_experts} experts" if m.num_experts > 1 else ""
    return (f"{m.name}: {m.num_layers} layers, {m.num_heads} heads, {m.num_kv_heads} KV heads "
            f"({m.attention_kind}{group}), head_dim {m.head_dim}, hidden {m.hidden_size}"
            f"{experts}, {_params(m.num_params)} parameters, context {m.max_context:,}")


def _arithmetic(p: CapacityPlan) -> list[str]:
    m, kv = p.model, p.kv
    fmts = [kv_format(name) for name in dict.fromkeys(split_kv_dtype(kv.kv_cache_dtype))]
    element = " / ".join(f"{f.bits / 8:g} B ({short_kv_dtype(f.name)})" for f in fmts)
    described = [f.description for f in fmts if f.scale_group not in (None, "tensor")]
    if described:
        element += f" + scales ({'; '.join(described)})"
    return [
        f"  per token per layer  {kv.bytes_per_token_per_layer:>14,} B  = 2 (K and V) x "
        f"{m.num_kv_heads} KV heads x {m.head_dim} head_dim x {element}",
        f"  per token            {kv.bytes_per_token:>14,} B  = {human(kv.bytes_per_token)}: "
        f"x {m.num_layers} layers",
        f"  per request          {kv.bytes_per_request:>14,} B  = {human(kv.bytes_per_request)}: "
        f"{p.context:,} tokens in {kv.blocks_per_request:,} blocks of {p.block_size}",
    ]


def _budget(p: CapacityPlan) -> list[str]:
    why = "activations, CUDA context, allocator slack"
    return [
        f"  memory               {gib(p.memory_bytes):>12} GiB",
        f"  weights              {gib(p.weights_bytes):>12} GiB  "
        f"({_params(p.model.num_params)} parameters, {p.weights_dtype})",
        f"  runtime reserve      {gib(p.reserve_bytes):>12} GiB  "
        + ("(none)" if p.reserve_text == "none" else f"({p.reserve_text}: {why})"),
        f"  left for KV cache    {gib(p.kv_budget_bytes):>12} GiB  = {p.kv.pool_blocks:,} blocks "
        f"of {p.block_size} tokens ({p.kv.pool_blocks * p.block_size:,} tokens)",
    ]


def _table(p: CapacityPlan) -> list[str]:
    head = (f"  {'KV dtype':<8} {'bytes/token':>12} {'per request':>13} "
            f"{'requests @' + format(p.context, ','):>18} {'context @' + str(p.concurrency):>13}"
            f"  fits")
    rows = [head]
    for d in p.by_kv_cache_dtype.values():
        mark = " <" if d.kv_cache_dtype == p.kv.kv_cache_dtype else ""
        rows.append(f"  {d.kv_cache_dtype:<8} {d.bytes_per_token:>12,} "
                    f"{human(d.bytes_per_request):>13}"
                    f" {d.max_concurrent_requests:>18,} {d.max_context_at_concurrency:>13,}"
                    f"  {'yes' if d.fits else 'no'}{mark}")
    return rows


def _mistake(p: CapacityPlan) -> list[str]:
    m, kv = p.model, p.kv
    mha, real = p.mha_formula_bytes_per_token, kv.bytes_per_token
    bits = [kv_format(name).bits for name in split_kv_dtype(kv.kv_cache_dtype)]
    bytes_each = f"{sum(bits) / 16:g} B"
    lines = [f"The common mistake: 2 x hidden ({m.hidden_size}) x layers ({m.num_layers}) x "
             f"{bytes_each} = {mha:,} B ({human(mha)}) per token, the multi-head formula,"]
    if m.attention_kind == "MHA" and m.num_heads * m.head_dim == m.hidden_size:
        lines.append("  is right for this model: every one of its heads keeps its own K and V.")
        return lines
    lines.append(f"  assumes all {m.num_heads} heads keep their own K and V. {m.name} keeps "
                 f"{m.num_kv_heads} KV head{'s' if m.num_kv_heads > 1 else ''} of {m.head_dim} "
                 f"({m.attention_kind}): {real:,} B ({human(real)}), {mha / real:.1f}x "
                 f"{'less' if mha > real else 'more'}.")
    return lines


def render(p: CapacityPlan) -> str:
    m = p.model
    lines = [_shape_line(p), f"  from {m.source}", "",
             f"KV cache at {p.context:,} tokens x {p.concurrency} requests, {p.kv.kv_cache_dtype}, "
             f"blocks of {p.block_size} tokens:", *_arithmetic(p), "", *_budget(p), "",
             f"  max concurrent requests at {p.context:,} tokens: {p.kv.max_concurrent_requests:,}",
             f"  max context at {p.concurrency} requests: {p.kv.max_context_at_concurrency:,} "
             f"tokens" + (" (the model's own limit)"
                          if p.kv.max_context_at_concurrency == m.max_context else ""), ""]
    if p.retention is not None:
        lines += [f"  --cache-policy sinks: each request holds its {p.retention.sink_tokens} sink "
                  f"tokens and a {p.retention.window:,}-token window (and the block being "
                  f"written), however long it runs.", ""]
    if m.num_sliding_layers:
        lines += [f"  {m.num_sliding_layers} of {m.num_layers} layers attend to a "
                  f"{m.sliding_window:,}-token sliding window: they hold at most that many tokens "
                  f"per request (an engine that frees blocks outside the window).", ""]
    if p.fits:
        lines.append(f"Fits: {p.concurrency} x {p.context:,} tokens in {p.kv.kv_cache_dtype} "
                     f"use {gib(p.concurrency * p.kv.bytes_per_request)} of "
                     f"{gib(p.kv_budget_bytes)} GiB.")
    else:
        lines.append("Does NOT fit: " + "; ".join(p.problems) + ".")
        lines += [f"  would fit with {s}" for s in p.suggestions]
    lines += ["", "Every KV dtype side by side:", *_table(p), "", *_mistake(p)]
    return "\n".join(lines)


def render_simulation(sim: SimulationResult, workload: Workload, cost: StepCost) -> str:
    d = sim.to_dict()
    shared = (f", {workload.shared_prefix_fraction:.0%} start with one "
              f"{workload.shared_prefix_tokens:,}-token prefix"
              if workload.shared_prefix_fraction else "")
    usage = d["peak_kv_usage"]
    lines = [
        "Simulated traffic through the real scheduler, block pool and prefix cache (no model):",
        f"  {workload.num_requests} requests, Poisson {workload.arrival_rate:g}/s, prompts "
        f"{workload.prompt_tokens.describe()} tokens, outputs {workload.output_tokens.describe()}"
        f"{shared}; step cost {cost.base_ms:g} ms + {cost.per_token_ms:g} ms per token (assumed)",
        f"  KV pool           {sim.num_blocks_total:,} blocks of {sim.block_size} tokens "
        f"({human(sim.num_blocks_total * sim.bytes_per_block)})",
        f"  peak blocks used  {sim.peak_blocks_used:,} ({usage:.1%}) = {human(sim.peak_kv_bytes)}",
        f"  preemptions       {sim.num_preemptions:,}",
        f"  queueing          at most {sim.max_waiting} waiting, {sim.max_running} running; wait "
        f"p50 {d['queue_wait_s_p50']:.2f} s, p95 {d['queue_wait_s_p95']:.2f} s, "
        f"max {d['queue_wait_s_max']:.2f} s",
        f"  TTFT              p50 {d['ttft_s_p50']:.2f} s, p95 {d['ttft_s_p95']:.2f} s",
        f"  prefix cache      {sim.prefix_hit_rate:.1%} of prompt tokens hit"
        + (" (re-admissions after preemption included)" if sim.num_preemptions else ""),
        f"  throughput        {d['output_tokens_per_s']:,.0f} output tokens/s over "
        f"{sim.duration_s:,.1f} s simulated",
    ]
    if sim.num_rejected:
        lines.append(f"  rejected          {sim.num_rejected} (past the context or the pool)")
    if sim.num_preemptions or usage >= 1.0:
        lines.append(f"Verdict: the pool ran full ({sim.num_preemptions} preemptions): this "
                     "traffic needs more KV memory, a smaller KV dtype, or fewer requests at once.")
    else:
        lines.append(f"Verdict: fits, peak {usage:.1%} of the pool and no preemptions.")
    return "\n".join(lines)
