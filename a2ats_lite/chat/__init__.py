"""Chat: the resource-bounded jinja sandbox templates render in (sandbox.py), the chat
templating on top of it (templates.py) and the interactive REPL (session.py).

Imports run one way: session -> templates -> sandbox.
"""
from .session import ChatSession, session_stops
from .templates import (FALLBACK_STOP_STRINGS, FALLBACK_TEMPLATE, chat_prompt_text,
                        chat_stop_strings, chat_template_for, normalize_roles, prompt_for_chat,
                        render_chat, strip_duplicate_bos)

__all__ = [
    "FALLBACK_STOP_STRINGS", "FALLBACK_TEMPLATE", "ChatSession", "chat_prompt_text",
    "chat_stop_strings", "normalize_roles",
    "chat_template_for", "prompt_for_chat", "render_chat", "session_stops",
    "strip_duplicate_bos",
]
