"""POST /tokenize and /detokenize, in vLLM's shapes: a prompt (or chat messages, rendered with the
chat template as /v1/chat/completions renders them) to token ids and back. How people check where
block boundaries fall before counting on a prefix-cache hit. Routing is app.py's.
"""

import asyncio

from kvserve.errors import InvalidRequestError
from kvserve.server import protocol as P
from kvserve.server.chat import chat_prompt
from kvserve.server.errors import APIError
from kvserve.server.state import ServerState
from kvserve.server.submission import check_model
from kvserve.server.tools import tool_plan


async def tokenize(state: ServerState, body: P.TokenizeCompletionRequest | P.TokenizeChatRequest
                   ) -> P.TokenizeResponse:
    check_model(state, body.model)
    try:
        ids = await asyncio.to_thread(_tokenize, state, body)
    except InvalidRequestError as err:
        param = "prompt" if isinstance(body, P.TokenizeCompletionRequest) else "messages"
        raise APIError(400, str(err), param=param) from None
    strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return P.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids,
                              token_strs=strs)


def _tokenize(state: ServerState, body: P.TokenizeCompletionRequest | P.TokenizeChatRequest
              ) -> list[int]:
    tok = state.tokenizer
    if isinstance(body, P.TokenizeCompletionRequest):
        state.engine.check_text_length(body.prompt)
        return tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    chat = P.ChatCompletionRequest.model_validate({
        "messages": [m.model_dump(exclude_none=True) for m in body.messages],
        "add_generation_prompt": body.add_generation_prompt,
        "continue_final_message": body.continue_final_message,
        **({"tools": [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools]}
           if body.tools else {})})
    ids = chat_prompt(state, chat, tool_plan(chat))
    if body.add_special_tokens and tok.add_bos and (not ids or ids[0] != tok.bos_token_id):
        ids.insert(0, tok.bos_token_id)
    return ids


async def detokenize(state: ServerState, body: P.DetokenizeRequest) -> P.DetokenizeResponse:
    check_model(state, body.model)
    vocab = state.engine.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (size {vocab})",
                       param="tokens")
    text = await asyncio.to_thread(state.tokenizer.decode, body.tokens, False)
    return P.DetokenizeResponse(prompt=text)
