"""Logprobs in the OpenAI shapes, from the engine's `TokenLogprobs`.

Completions (the legacy shape lm-evaluation-harness reads): parallel lists `tokens`,
`token_logprobs`, `top_logprobs` (a dict token text -> logprob, the chosen token included, as vLLM
does) and `text_offset` (where each token's text starts in the choice's text). With `echo`, the
prompt's tokens come first, the very first with `null` logprobs (nothing predicts it).

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.

Token texts are each token decoded alone, as vLLM reports them (a token that is part of a
multi-byte character shows as U+FFFD).
"""

from __future__ import annotations

from typing import Any

from dscluster.engine.api import TokenLogprobs


class TokenTexts:
    """Each token id's text, decoded once per request."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text


class CompletionLogprobs:
    """One choice's logprobs in the completions shape, block by block (a stream sends one block per
    chunk); text offsets run on across blocks."""

    def __init__(self, texts: TokenTexts, offset: int = 0):
        self.texts = texts
        self.offset = offset

    def block(self, tokens: list[int], entries: list[TokenLogprobs | None]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries, strict=True):
            text = self.texts(token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry.logprob)
            top: dict[str, float] = {}
            for t, lp in entry.top:    # most likely first: of two tokens with one text, the likelier stays
                top.setdefault(self.texts(t), lp)
            top.setdefault(text, entry.logprob)
            out["top_logprobs"].append(top)
        return out


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprobs]) -> dict:
    def item(token: int, logprob: float) -> dict:
        text = texts(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}
