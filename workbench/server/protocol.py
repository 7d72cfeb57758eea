"""The OpenAI wire format: request bodies, response objects and OpenAI's error JSON.

Pure data, no engine: the routes in `app.py` parse a body into one of these
models, turn it into the engine's `SamplingParams`, and build responses with
the helpers below. Bodies are parsed strictly (a string where a number belongs
is a 400, not a silent coercion). A field OpenAI defines and the engine cannot
honour (`logprobs`, `n > 1`, `tools`, ...) is declared here so that setting it
is a 400 naming it; a field nobody defines is ignored, as OpenAI does.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..request import RequestOutput, SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat's is "what fits")


# ====================================================================== errors
@dataclass
class APIError(Exception):
    """An error the client sees as `{"error": {message, type, param, code}}` with `status`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code, self.type)


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; the type follows the status unless given."""
    return {"error": {"message": message, "type": type or ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


# Engine field names as the HTTP client knows them (the engine's ValueError texts name its own fields).
_ENGINE_TO_HTTP = {"max_new_tokens": "max_tokens"}


def engine_value_error(exc: ValueError, *, prompt_field: str, max_tokens_field: str = "max_tokens") -> APIError:
    """A 400 from the engine's own validation message, its field renamed to the one the client sent.

    The engine's messages start with the field they reject ("top_p must be in (0, 1], got 2"),
    so the message keeps the allowed range and only the name changes.
    """
    message = str(exc)
    match = re.match(r"[a-z_]+", message)
    field = match.group(0) if match else None
    code = None
    if field == "prompt":
        if message.startswith("prompt is "):
            code = "context_length_exceeded"
        message = message.replace("prompt messages", prompt_field, 1).replace("prompt", prompt_field, 1)
        field = prompt_field
    elif field == "max_new_tokens":
        message = message.replace("max_new_tokens", max_tokens_field)
        field = max_tokens_field
        code = "context_length_exceeded" if "exceeds" in message else None
    elif field is not None:
        field = _ENGINE_TO_HTTP.get(field, field)
    return APIError(400, message, param=field, code=code)


# ====================================================================== requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields both routes share, and the ones they refuse."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None  # extension (vLLM's name)
    ignore_eos: bool = False  # extension (vLLM's name)
    # Defined by OpenAI (or vLLM) and not supported: any value but the neutral one is a 400 naming it.
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    repetition_penalty: Any = None
    min_p: Any = None
    min_tokens: Any = None
    stop_token_ids: Any = None
    include_stop_str_in_output: Any = None
    use_beam_search: Any = None
    prompt_logprobs: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: Any = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None


# field -> the values that ask for nothing (so sending them, as some clients do, is fine)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "repetition_penalty": (None, 1), "min_p": (None, 0), "min_tokens": (None, 0),
    "stop_token_ids": (None, []), "include_stop_str_in_output": (None, False), "use_beam_search": (None, False),
    "prompt_logprobs": (None, 0), "response_format": (None, {"type": "text"}), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,),
    "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}


def check_supported(body: _Common) -> None:
    """Raise a 400 naming the first field that asks for something the engine does not do."""
    if body.n is not None and body.n != 1:
        raise APIError(400, f"n must be 1 (one choice per request is supported), got {body.n}", param="n",
                       code="unsupported_parameter")
    for name, neutral in _NEUTRAL.items():
        if name in type(body).model_fields:
            value = getattr(body, name)
            if not _is_neutral(value, neutral):
                raise APIError(400, f"{name} is not supported by this server (got {value!r})", param=name,
                               code="unsupported_parameter")


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Equal to one of the neutral values (0.0 counts as 0; True does not count as 1)."""
    return value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def sampling_params(body: _Common, max_new_tokens: int) -> SamplingParams:
    """The engine's sampling parameters; the engine's `validate` names a bad value and its range.

    OpenAI's default temperature is 1 (the engine's is greedy), so unset means 1 here.
    """
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_k=0 if body.top_k is None else body.top_k, top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed, stop=() if body.stop is None else body.stop, ignore_eos=body.ignore_eos,
    )


def completion_prompt(body: CompletionRequest) -> str | list[int]:
    """The one prompt of a completions body: a string or token ids (a batch of several is refused)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt must hold one prompt (batches are not supported), got {len(prompt)}",
                           param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    return prompt


CHAT_ROLES = ("system", "developer", "user", "assistant")


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template takes them: text only, `developer` read as `system`."""
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {list(CHAT_ROLES)} (tool calls are not "
                           f"supported), got {m.role!r}", param=f"messages[{i}].role")
        if m.tool_calls:
            raise APIError(400, f"messages[{i}].tool_calls is not supported", param=f"messages[{i}].tool_calls",
                           code="unsupported_parameter")
        content = m.content
        if content is None:
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts, got null",
                           param=f"messages[{i}].content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}] must be a text part ({{'type': 'text', "
                                   f"'text': ...}}); got type {part.type!r}", param=f"messages[{i}].content[{j}]")
            content = "".join(part.text or "" for part in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


# Pydantic's union errors name every member type; say once what the field takes instead.
_UNION_TYPES = {
    "prompt": "a string, a list of token ids, or a list holding one string or one list of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Pydantic's errors (a malformed body or a wrong type) as one 400 naming the first bad field."""
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}",
                        code="invalid_json")
    path = [p for p in err.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = _param_name(path)
    if not path:  # the body itself is wrong (not an object)
        return APIError(400, f"the body must be a JSON object: {err.get('msg')}", code="invalid_body")
    last = next((p for p in reversed(path) if isinstance(p, str)), "")
    if err.get("type") == "missing":
        return APIError(400, f"{param} is required", param=param)
    if last in _UNION_TYPES:
        return APIError(400, f"{param} must be {_UNION_TYPES[last]}; got {_short(err.get('input'))}", param=param)
    return APIError(400, f"{param}: {err.get('msg')}, got {_short(err.get('input'))}", param=param)


def _is_type_tag(part: Any) -> bool:
    """A union member's tag in a pydantic location ('str', 'list[int]', 'TextPart'), not a field."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or "[" in part
                                      or part[:1].isupper() or part.startswith("function-"))


def _param_name(path: list[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ====================================================================== responses
def finish_reason(reason: str | None) -> str | None:
    """The engine's reasons in OpenAI's words (a cancelled request was aborted)."""
    return {"cancelled": "abort"}.get(reason or "", reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(slots=True)
class ResponseShape:
    """What differs between /v1/completions and /v1/chat/completions when building a response."""

    chat: bool
    id: str
    model: str
    created: int

    @classmethod
    def new(cls, chat: bool, request_id: str, model: str) -> "ResponseShape":
        return cls(chat, request_id, model, int(time.time()))

    def full(self, output: RequestOutput) -> dict[str, Any]:
        """The non-streaming response."""
        reason = finish_reason(output.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": output.text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": output.text, "logprobs": None, "finish_reason": reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(len(output.prompt_token_ids), len(output.token_ids))}

    def chunk(self, text: str | None, reason: str | None = None, *, role: bool = False,
              with_usage_key: bool = False) -> dict[str, Any]:
        """One streamed chunk; `role` makes chat's first delta carry the assistant role."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if with_usage_key:
            out["usage"] = None
        return out

    def text_events(self, with_usage_key: bool = False) -> tuple[bytes, bytes]:
        """The bytes before and after a JSON-quoted text in a token's SSE event.

        A stream sends one event per token per request, so its frame is built once and
        each token only quotes its text (`prefix + json.dumps(text) + suffix`)."""
        marker = "\x00TEXT\x00"
        frame = sse(self.chunk(marker, with_usage_key=with_usage_key))
        prefix, suffix = frame.split(json.dumps(marker).encode(), 1)
        return prefix, suffix

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage`: no choices, the usage."""
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
