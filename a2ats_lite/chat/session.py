"""The interactive chat REPL (`a2ats-lite chat`): the conversation, its trimming to
the context, and the stop strings a model's chat format needs.

Works with anything that offers what it uses of a Runtime: chat_prompt, stream,
n_ctx, timings (and chat_stop or file for session_stops).
"""
from __future__ import annotations

import click

from ..errors import A2ATSError
from .templates import chat_stop_strings


def session_stops(rt) -> list[str]:
    """The stop strings of the model's chat format (the plain fallback needs some)."""
    if callable(getattr(rt, "chat_stop", None)):     # Runtime.chat_stop()
        return list(rt.chat_stop())
    f = getattr(rt, "file", None)
    template = f.get("tokenizer.chat_template") if f is not None else None
    return chat_stop_strings(template)


class ChatSession:
    """The interactive loop: keeps the conversation inside the context by dropping
    the oldest whole turns (a user message with the replies that follow it; the
    system message stays), so templates that require user/assistant alternation
    keep working. A failure in one turn (a template error, a message too long for
    the context) is reported on one line and the session goes on with the history
    unchanged. Ctrl-C stops the current reply; an interrupted or empty reply is not
    kept, and neither is the user message it answered."""

    def __init__(self, rt, system=None, max_tokens=512, show_timings=False, sampling=None,
                 stop=None):
        self.rt, self.system, self.max_tokens = rt, system, max_tokens
        self.show_timings, self.sampling = show_timings, dict(sampling or {})
        self.stop = list(stop or [])
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _head(self, messages) -> int:
        return 1 if messages and messages[0].get("role") == "system" else 0

    def _fit(self, messages: list[dict]) -> tuple[list[int], list[dict]]:
        """Prompt ids of the conversation and the messages they hold: the oldest whole
        turns dropped until the prompt plus room for a reply fits the context."""
        head = self._head(messages)
        room = min(self.max_tokens, self.rt.n_ctx // 2)
        while True:
            ids = self.rt.chat_prompt(messages)
            users = [i for i in range(head, len(messages)) if messages[i].get("role") == "user"]
            if len(ids) + room <= self.rt.n_ctx or len(users) <= 1:
                return ids, messages
            # drop the oldest turn: everything before the second user message
            messages = messages[:head] + messages[users[1]:]

    def run(self):
        click.echo("chat: /reset clears the conversation, /exit or Ctrl-D quits, "
                   "Ctrl-C stops a reply", err=True)
        while True:
            try:
                line = input("> ")
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                click.echo()
                continue
            cmd = line.strip()
            if cmd == "/exit":
                return
            if cmd == "/reset":
                self.reset()
                click.echo("[conversation cleared]", err=True)
                continue
            if cmd:
                self.turn(line)

    def turn(self, line: str) -> str | None:
        """One exchange; returns the reply kept in the history, or None."""
        try:
            ids, messages = self._fit(self.messages + [{"role": "user", "content": line}])
        except A2ATSError as e:        # e.g. the template refuses this conversation
            click.echo(f"error: {e}", err=True)
            return None
        if len(ids) >= self.rt.n_ctx:
            click.echo(f"error: this message alone ({len(ids)} tokens) does not fit the context "
                       f"({self.rt.n_ctx}); raise -c", err=True)
            return None
        reply, interrupted = "", False
        try:
            for piece in self.rt.stream(ids, max_tokens=self.max_tokens, stop=self.stop,
                                        **self.sampling):
                reply += piece
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            interrupted = True
            click.echo(" [stopped]", nl=False)
        except A2ATSError as e:
            click.echo()
            click.echo(f"error: {e}", err=True)
            return None
        click.echo()
        if self.show_timings:
            click.echo(self.rt.timings.line(), err=True)
        reply = reply.strip()
        if interrupted or not reply:
            if not interrupted:
                click.echo("[empty reply: not kept in the conversation]", err=True)
            return None
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply
