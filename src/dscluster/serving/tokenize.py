"""vLLM's /tokenize and /detokenize: text or chat messages to token ids, and back, with the served
model's tokenizer (what lm-evaluation-harness, benchmark clients and routers use to count tokens
the way the server does)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from dscluster.serving.openai import check_in_vocabulary, check_model, chat_prompt_ids
from dscluster.serving.protocol import DetokenizeRequest, TokenizeRequest, bad_request, parse_model, read_json
from dscluster.serving.state import get_state

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    state = get_state(request)
    req: TokenizeRequest = parse_model(TokenizeRequest, await read_json(request, state.config.max_body_bytes))
    check_model(state, req.model)
    tok = state.engine.info.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send either prompt (text) or messages (chat)", param="prompt")
    if req.prompt is not None:
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok(req.prompt, add_special_tokens=add_special)["input_ids"]
    else:
        if not req.messages:
            raise bad_request("messages is empty", param="messages")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        ids = chat_prompt_ids(state, req.messages, req.add_generation_prompt, tools=tools)
        if req.add_special_tokens:
            ids = tok.build_inputs_with_special_tokens(ids)
    return {"count": len(ids), "max_model_len": state.engine.info.max_context, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if req.return_token_strs else None}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    state = get_state(request)
    req: DetokenizeRequest = parse_model(DetokenizeRequest, await read_json(request, state.config.max_body_bytes))
    check_model(state, req.model)
    check_in_vocabulary(state, req.tokens, "tokens")
    return {"prompt": state.engine.info.tokenizer.decode(req.tokens)}
