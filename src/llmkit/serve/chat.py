"""Chat messages to prompt ids through the model's chat template.

Roles: system, developer (OpenAI's newer name for system instructions; templates know "system", so
it is passed as that), user, assistant (its content may be empty when it only made tool calls) and
tool. Content is a string or a list of parts; text parts are joined with newlines, any other part
(images, audio) is a 400, since these models read text only. A tokenizer without a chat template is
refused with a 400 instead of silently falling back to a format the model never saw (serve with
`chat_template=FILE` to give one)."""
from __future__ import annotations

from typing import Optional

from .errors import bad_request
from .protocol import ChatMessage

ROLES = ("system", "developer", "user", "assistant", "tool")


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise bad_request(f"messages[{i}].role", f"messages[{i}].role={m.role!r}: expected one of {list(ROLES)}")
        if m.content is None:
            if m.role != "assistant":
                raise bad_request(f"messages[{i}].content", f"messages[{i}].content is missing: expected a string "
                                                            "or a list of text parts")
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}]",
                                      f"messages[{i}].content[{j}].type={part.type!r}: this model reads text only; "
                                      "expected {\"type\": \"text\", \"text\": ...}")
                texts.append(part.text)
            content = "\n".join(texts)
        d = {"role": "system" if m.role == "developer" else m.role, "content": content}
        for key in ("name", "tool_call_id", "tool_calls"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        out.append(d)
    return out


def chat_prompt(tokenizer, messages: list[ChatMessage], template: Optional[str], model: str) -> list[int]:
    """Token ids of the rendered conversation, ending with the assistant's turn opened."""
    template = template or tokenizer.chat_template
    if not template:
        raise bad_request("messages", f"model {model!r} has no chat template (its tokenizer_config.json has no "
                                      "chat_template): expected /v1/completions with a prompt, or a server started "
                                      "with chat_template=FILE")
    dicts = message_dicts(messages)
    try:
        return tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tokenize=True, chat_template=template)
    except ValueError as exc:           # the template's raise_exception ("roles must alternate", ...)
        raise bad_request("messages", f"messages: the chat template refused them: {exc}") from exc
