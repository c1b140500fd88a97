"""/tokenize and /detokenize (vLLM's shapes) on a tiny-model server: a prompt and chat messages
round-trip through /detokenize, the chat form counts exactly the tokens /v1/chat/completions
bills, and bad input is a 400 naming the field (an API key is needed where keys are set)."""

from __future__ import annotations

import pytest
import requests

KEY = "sk-tokenize-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(server_factory, tiny_flags):
    return server_factory(*tiny_flags, "--api-key", KEY)


def _post(server, path, body, headers=AUTH):
    return requests.post(server.url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("text", ["the cache keeps keys", "naïve café ☕ – déjà vu", " x  y\n"])
def test_a_prompt_round_trips(server, text):
    r = _post(server, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 0
    assert body["max_model_len"] == 256
    back = _post(server, "/detokenize", {"tokens": body["tokens"]}).json()["prompt"]
    assert back.endswith(text)  # after the BOS, when the tokenizer adds one
    plain = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert _post(server, "/detokenize", {"tokens": plain["tokens"]}).json()["prompt"] == text


def test_chat_messages_count_what_the_chat_endpoint_bills(server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a KV cache?"}]
    ids = _post(server, "/tokenize", {"messages": messages}).json()["tokens"]
    out = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}).json()
    assert out["usage"]["prompt_tokens"] == len(ids)
    text = _post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert "What is a KV cache?" in text and "Be brief." in text


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/tokenize", {"prompt": "x" * 400_000}, 400, "prompt"),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"prompt": "hi", "model": "other"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "a"}],
                   "continue_final_message": True}, 400, "continue_final_message"),
])
def test_bad_input_is_named(server, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
    assert _post(server, "/tokenize", {"prompt": "still here"}).status_code == 200


def test_a_key_is_needed(server):
    assert _post(server, "/tokenize", {"prompt": "hi"}, headers={}).status_code == 401
    assert _post(server, "/detokenize", {"tokens": [1]}, headers={}).status_code == 401
