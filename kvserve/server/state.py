"""What every handler shares: the engine, the server's config, the served model name, its metrics
and its tenants (API key -> cache salt), plus the limits read off the engine. No HTTP here.
"""

import dataclasses
import hashlib
import hmac
from collections.abc import Sequence
from typing import Protocol

from kvserve.config import ServerConfig
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.server.metrics import ServerMetrics


class Tokenizer(Protocol):
    """What the server uses of the engine's tokenizer (AsyncLLMEngine.tokenizer)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> list[int]: ...


@dataclasses.dataclass
class ServerState:
    engine: AsyncLLMEngine
    config: ServerConfig
    model_name: str
    metrics: ServerMetrics
    tenants: dict[str, str]  # api key -> tenant salt

    @classmethod
    def create(cls, engine: AsyncLLMEngine, config: ServerConfig, model_name: str,
               collectors: Sequence[object] = ()) -> "ServerState":
        return cls(engine, config, model_name,
                   ServerMetrics(lambda: engine.stats, model_name, collectors),
                   {key: tenant_salt(key) for key in config.api_keys})

    def __post_init__(self) -> None:
        # sha256 of each key: every comparison then takes the same time whatever the key's
        # length or how much of it a guess gets right
        self._key_digests = [(hashlib.sha256(k.encode()).digest(), salt)
                             for k, salt in self.tenants.items()]

    def authenticate(self, authorization: str | None) -> str | None:
        """The tenant salt of an 'Authorization: Bearer KEY' header value, or None if it names
        no key. Compares against every key in constant time (no early exit, no dict lookup)."""
        scheme, _, key = (authorization or "").partition(" ")
        given = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for digest, salt in self._key_digests:
            if hmac.compare_digest(digest, given) and scheme.lower() == "bearer":
                found = salt
        return found

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_body_bytes(self) -> int:
        """--max-body-bytes, or by default room for four of the longest text prompts the context
        admits (max_model_len x the longest token, in bytes; JSON escapes can double them), and
        never under 4 MiB: a bigger body cannot be a valid single-prompt request, and rejecting
        it from its headers spares the event loop from receiving and parsing it."""
        if self.config.max_body_bytes is not None:
            return self.config.max_body_bytes
        longest = self.engine.max_model_len * self.engine.tokenizer.max_token_bytes
        return max(4 * 2**20, 4 * longest)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_new_tokens(self) -> int:
        """The largest max_tokens this server takes: the context less one prompt token, or
        the max_output_tokens limit."""
        limit = self.engine.max_output_tokens
        most = self.max_model_len - 1
        return most if limit is None else min(most, limit)


def tenant_salt(api_key: str) -> str:
    return "tenant:" + hashlib.sha256(api_key.encode()).hexdigest()[:32]
