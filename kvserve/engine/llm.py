"""The offline Python API: LLM(...).generate / .chat / .stream, over one LLMEngine.

Prompts are strings or vLLM-style dicts ({"prompt": ...} or {"prompt_token_ids": [...]});
n > 1 fans out into n sequences whose outputs are gathered back into one RequestOutput.
Results come back in input order.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from kvserve.config import EngineConfig, engine_settings
from kvserve.engine.engine import LLMEngine
from kvserve.errors import EngineStepError, InvalidRequestError
from kvserve.request import Request, RequestOutput, SamplingParams, derive_seed

PromptInput = str | dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParsedPrompt:
    prompt: str | list[int]
    cache_salt: str | None = None


def _prompt_of(item: PromptInput) -> ParsedPrompt:
    if isinstance(item, str):
        return ParsedPrompt(item)
    if isinstance(item, dict):
        unknown = set(item) - {"prompt", "prompt_token_ids", "cache_salt"}
        if unknown:
            raise InvalidRequestError(f"unknown prompt field(s): {', '.join(sorted(unknown))}")
        salt = item.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise InvalidRequestError("cache_salt must be a non-empty string")
        if "prompt_token_ids" in item:
            ids = item["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise InvalidRequestError("prompt_token_ids must be a list of integers")
            return ParsedPrompt(list(ids), salt)
        if isinstance(item.get("prompt"), str):
            return ParsedPrompt(item["prompt"], salt)
    raise InvalidRequestError(
        "each prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]} "
        "(either dict may add 'cache_salt': str)")


class LLM:
    """`LLM()` loads the embedded SmolLM2-135M-Instruct; `model=` takes a GGUF or HF folder."""

    def __init__(self, model: str | None = None, **settings: Any):
        """Keywords are the engine settings (config.engine_settings(): dtype, device,
        cache_mode, kv_cache_dtype, kv_cache_memory, block_size, max_model_len, ...); an
        unknown keyword is a ConfigError naming it."""
        config = EngineConfig.create(model=model, **settings)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        self.last_output: RequestOutput | None = None

    def _add(self, parsed: ParsedPrompt, params: SamplingParams,
             token_ids: list[int] | None = None) -> tuple[str, list[Request]]:
        request_id = str(next(self._ids))
        prompt = parsed.prompt
        token_ids = token_ids if token_ids is not None else self.engine.encode_prompt(prompt)
        text = prompt if isinstance(prompt, str) else None
        samples = []
        try:
            for i in range(params.n):
                p = params if params.seed is None or i == 0 else dataclasses.replace(
                    params, seed=derive_seed(params.seed, i))
                samples.append(self.engine.add_request(f"{request_id}-{i}", token_ids, p,
                                                       prompt_text=text,
                                                       cache_salt=parsed.cache_salt))
        except Exception:
            for r in samples:
                self.engine.abort_request(r.request_id)
            raise
        return request_id, samples

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(items):
                raise InvalidRequestError(f"got {len(sampling_params)} sampling params for "
                                          f"{len(items)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(items)
        for sp in params_list:
            if not isinstance(sp, SamplingParams):
                raise InvalidRequestError(
                    f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        # Validate every prompt before queueing any: a bad one must not leave others half-run.
        parsed = [_prompt_of(p) for p in items]
        token_ids = [self.engine.encode_prompt(p.prompt) for p in parsed]
        groups: list[tuple[str, list[Request]]] = []
        try:
            for p, sp, ids in zip(parsed, params_list, token_ids):
                groups.append(self._add(p, sp, ids))
            self._run(sum(len(g[1]) for g in groups), use_tqdm)
        except BaseException:
            # A failure (or Ctrl-C) mid-run must not leave this call's requests in the engine,
            # where the next generate() would run them and nobody would collect them.
            for _, samples in groups:
                for r in samples:
                    self.engine.abort_request(r.request_id)
            raise
        outputs = []
        for request_id, samples in groups:
            for r in samples:
                self.engine.pop_finished(r.request_id)
            outputs.append(self.engine.make_output(request_id, samples))
        return outputs

    def _run(self, num_seqs: int, use_tqdm: bool) -> None:
        bar = tqdm(total=num_seqs, desc="generating", unit="seq",
                   disable=not use_tqdm or num_seqs < 2)
        try:
            while self.engine.has_unfinished_requests():
                deltas = self.engine.step()
                failed = next((d for d in deltas if d.error is not None), None)
                if failed is not None:  # generate() aborts the rest of this call's requests
                    raise EngineStepError(f"request {failed.request_id}: {failed.error}")
                bar.update(sum(d.finished for d in deltas))
        finally:
            bar.close()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; False if prefix caching is off."""
        return self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Hand what the disk tier does not hold yet down to it and wait for the writes (a
        later LLM on the same --disk-offload-dir reuses them); nothing to do without one."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.encode_chat(c, add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def encode_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt)
        # The template writes its own special tokens; do not add a BOS on top of them.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yield text pieces of one completion (n must be 1) as the engine produces them."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise InvalidRequestError("stream() produces one completion: n must be 1")
        _, (r,) = self._add(_prompt_of(prompt), params)
        request_id = r.request_id
        try:
            while not r.status.finished:
                for delta in self.engine.step():
                    if delta.request_id == request_id and delta.error is not None:
                        raise EngineStepError(delta.error)
                    if delta.request_id == request_id and delta.new_text:
                        yield delta.new_text
        finally:
            if not r.status.finished:
                self.engine.abort_request(request_id)
        self.engine.pop_finished(request_id)
        # The whole output, with its metrics (TTFT, decode speed), for callers that want them.
        self.last_output = self.engine.make_output(request_id, [r])


def _signature() -> inspect.Signature:
    """LLM(...)'s keywords as help() and IDEs show them, derived from the settings."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for s in engine_settings():
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if s.name == "model"
                else inspect.Parameter.KEYWORD_ONLY)
        params.append(inspect.Parameter(s.name, kind, default=s.default))
    return inspect.Signature(params)


LLM.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
