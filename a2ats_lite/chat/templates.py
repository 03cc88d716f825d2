"""Chat templating: render a conversation to prompt text, as HF transformers'
apply_chat_template does, with the model's template or the plain fallback format.

Which template a model uses (chat_template_for), the stop strings its format needs
(chat_stop_strings), message checks, and the prompt text plus BOS flag to tokenize
(prompt_for_chat). Every template renders inside chat/sandbox.py's resource-bounded
sandbox; without a template (the default model is a base model) FALLBACK_TEMPLATE is
used, see its comment.
"""

from __future__ import annotations

from ..errors import TemplateError
from . import sandbox

# Plain format for models without a chat template (base models):
#     "System: {content}\n\nUser: {content}\n\nAssistant: {content}\n\n...Assistant:"
# i.e. each message as "<Role>: <content>" (role capitalized) followed by a blank
# line; with add_generation_prompt the prompt ends with "Assistant:" and no
# trailing space, because SentencePiece vocabularies glue the space to the next
# word (" Hello"), so the model itself produces it. No BOS text: the tokenizer
# adds BOS per the model's metadata.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{{ message['content'] if message['content'] is not none else '' }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _check_messages(messages) -> int:
    if not isinstance(messages, (list, tuple)):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    size = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} must be a dict with a string 'role', got {m!r:.80}")
        size += len(str(m.get("content", "")))
    return size


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                **variables) -> str:
    """Render `messages` with a jinja chat template as HF apply_chat_template does.

    `variables` become template variables: special tokens (bos_token, eos_token, ...)
    and optional extras (tools, documents, date_string, ...). As in HF, `tools` and
    `documents` are passed as None unless given.
    Every renderer (Runtime.chat_prompt, the chat CLI, a server) goes through here, so
    the sandbox's resource limits apply to all of them.
    Raises TemplateError for syntax errors, raise_exception() calls, unsafe
    operations, resource guards and any other rendering failure.
    """
    sandbox.check_source(template)
    size = _check_messages(messages) + sandbox.value_size(variables.values())
    ctx = {"tools": None, "documents": None, **variables,
           "messages": messages, "add_generation_prompt": bool(add_generation_prompt)}
    return sandbox.render(template, ctx, size)


def chat_template_for(metadata_template) -> str:
    """The template to use: the GGUF's `tokenizer.chat_template`, else FALLBACK_TEMPLATE."""
    if metadata_template is None or (isinstance(metadata_template, str)
                                     and not metadata_template.strip()):
        return FALLBACK_TEMPLATE
    if not isinstance(metadata_template, str):
        raise TemplateError(f"tokenizer.chat_template must be a string, "
                            f"got {type(metadata_template).__name__}")
    return metadata_template


# What makes the fallback format safe for generation: a base model continuing
# "...Assistant:" soon writes the next "User:" (or "System:" / "Assistant:") turn itself;
# a line starting with a role name ends the reply. Real templates end turns with a
# special token the model emits (an end-of-generation id), so they need no strings.
FALLBACK_STOP_STRINGS = ["\nUser:", "\nAssistant:", "\nSystem:"]


def chat_stop_strings(metadata_template, messages=()) -> list[str]:
    """Stop strings to pass with a chat reply: FALLBACK_STOP_STRINGS, plus a line starting
    with any other role the conversation uses, when the model has no chat template (the
    plain fallback format); [] for a real template."""
    if chat_template_for(metadata_template) is not FALLBACK_TEMPLATE:
        return []
    stops = list(FALLBACK_STOP_STRINGS)
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        s = f"\n{str(role).capitalize()}:" if isinstance(role, str) and role else None
        if s and s not in stops:
            stops.append(s)
    return stops


# OpenAI's current name for the system role: templates know only "system"
ROLE_ALIASES = {"developer": "system"}


def normalize_roles(messages: list[dict]) -> list[dict]:
    """messages with ROLE_ALIASES applied (copies of the changed ones)."""
    return [dict(m, role=ROLE_ALIASES[m["role"]])
            if isinstance(m, dict) and m.get("role") in ROLE_ALIASES else m for m in messages]


def strip_duplicate_bos(text: str, bos_text: str) -> tuple[str, bool]:
    """Remove one leading BOS text; returns (text, whether the template emitted it).

    The tokenizer then adds BOS as a token id, so the prompt never starts with two
    BOS tokens (what llama.cpp's chat code does when the vocab adds BOS itself).
    """
    if bos_text and text.startswith(bos_text):
        return text[len(bos_text):], True
    return text, False


def prompt_for_chat(template, messages: list[dict], bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True, **variables) -> tuple[str, bool | None]:
    """Prompt text for a conversation and the add_bos flag to tokenize it with.

    `template` is the GGUF metadata value (None -> FALLBACK_TEMPLATE). add_bos is
    True when the template emitted the BOS text (stripped here, so the tokenizer's
    BOS is the only one), else None: the tokenizer's own default (the model's
    add_bos metadata), as llama.cpp. Tokenize the text with special=True, the
    content_spans as plain text (chat_prompt_text gives both).
    """
    text, add_bos, _ = chat_prompt_text(template, messages, bos_token, eos_token,
                                        add_generation_prompt, spans=False, **variables)
    return text, add_bos


def chat_prompt_text(template, messages: list[dict], bos_token: str = "", eos_token: str = "",
                     add_generation_prompt: bool = True, spans: bool = True, **variables
                     ) -> tuple[str, bool | None, list[tuple[int, int]] | None]:
    """prompt_for_chat plus the character spans of the text that are message contents
    (None when they cannot be told apart from the template's own text). Special tokens
    must come only from the template's markers, never from what a user or tool wrote:
    the tokenizer reads these spans with special tokens off."""
    template = chat_template_for(template)
    messages = normalize_roles(list(messages))
    kw = dict(bos_token=bos_token, eos_token=eos_token, **variables)
    text = render_chat(template, messages, add_generation_prompt, **kw)
    found = _content_spans(text, template, messages, add_generation_prompt, kw) if spans else None
    text, had_bos = strip_duplicate_bos(text, bos_token)
    if found is not None and had_bos:
        cut = len(bos_token)
        found = [(max(0, a - cut), b - cut) for a, b in found if b > cut]
    return text, (True if had_bos else None), found


_MARK = "\ue000{}\ue001"      # private-use characters: a placeholder for message i's content


def _content_spans(text, template, messages, add_generation_prompt, kw):
    """Render again with each content replaced by a placeholder; where the placeholders
    land, with the real contents put back (as they are, or stripped, for templates
    that trim), reproduces `text`, the contents' spans are known exactly. A template
    that transforms contents otherwise (or tests them) gives None."""
    marked = [dict(m, content=_MARK.format(i)) if isinstance(m.get("content"), str) else m
              for i, m in enumerate(messages)]
    try:
        skeleton = render_chat(template, marked, add_generation_prompt, **kw)
    except TemplateError:
        return None
    for strip in (False, True):
        out, spans, pos = [], [], 0
        for part in _split_marks(skeleton):
            if isinstance(part, int):
                c = messages[part]["content"]
                c = c.strip() if strip else c
                spans.append((pos, pos + len(c)))
                part = c
            out.append(part)
            pos += len(part)
        if "".join(out) == text:
            return [sp for sp in spans if sp[1] > sp[0]]
    return None


def _split_marks(skeleton: str) -> list:
    """skeleton split into template text (str) and message indices (int) at _MARK."""
    parts, pos = [], 0
    while True:
        a = skeleton.find("\ue000", pos)
        b = skeleton.find("\ue001", a + 1) if a >= 0 else -1
        if a < 0 or b < 0 or not skeleton[a + 1:b].isdigit():
            parts.append(skeleton[pos:])
            return parts
        parts += [skeleton[pos:a], int(skeleton[a + 1:b])]
        pos = b + 1
