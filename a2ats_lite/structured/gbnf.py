"""llama.cpp GBNF grammars converted to llguidance's Lark dialect, keeping GBNF's meaning.

llguidance ships a converter (llguidance.gbnf_to_lark); this module reuses its parser
and AST and changes two things that alter what a grammar accepts:

- Which rules become terminals. llguidance lexes a terminal greedily and never
  backtracks into it, so a rule made a terminal must not be able to go on with a
  character that may also follow it: in llama.cpp's arithmetic.gbnf,
  `num ::= [0-9]+ ws` (ws = [ \\t\\n]*) before `"\\n"` would swallow the newline and
  the line could never end. The shipped converter makes every rule over terminals a
  terminal; here a rule is one only when the characters that can extend a complete
  match (EXT) and the characters that can follow the rule anywhere in the grammar
  (FOLLOW) are disjoint; other rules stay grammar rules (Earley, no such loss).
  Character sets are ASCII bits plus one bit for all non-ASCII characters, so the
  test errs on the safe side.
- Escapes and `.`: `\\uXXXX` / `\\UXXXXXXXX` keep their leading zeros' meaning
  (the shipped parser drops them, so `\\u00e9` fails), and `.` is any character,
  newline included, as in llama.cpp.
"""
from __future__ import annotations

import functools
import re

from llguidance.gbnf_to_lark import (AlternativeNode, GrammarParser, LiteralNode, RegexNode,
                                     RepetitionNode, RuleRefNode, SequenceNode)

_ALL = (1 << 129) - 1                 # every ASCII character plus the non-ASCII bit
_NON_ASCII = 1 << 128
_NON_ASCII_SAMPLES = ("\x80", "\xa0", "\xe9", "\u2028", "\u4e2d", "\U0001f600")
_MAX_FIXPOINT_ROUNDS = 500


class _Parser(GrammarParser):
    """llguidance's GBNF parser with escapes that keep their code point."""

    def _parse_char(self, pos):
        if pos.current() == "\\" and pos.peek(2)[1:] in ("u", "U"):
            width = 4 if pos.peek(2)[1] == "u" else 8
            digits = pos.peek(2 + width)[2:]
            if len(digits) == width and all(c in "0123456789abcdefABCDEF" for c in digits):
                return _escape_code_point(int(digits, 16)), pos.advance(2 + width)
        return super()._parse_char(pos)

    def _parse_sequence(self, pos, is_nested):
        seq, pos = super()._parse_sequence(pos, is_nested)
        for i, node in enumerate(seq.nodes):     # GBNF's `.` is any character, newline too
            target = node.node if isinstance(node, RepetitionNode) else node
            if isinstance(target, RegexNode) and target.rx == ".":
                target.rx = "(?s:.)"
        return seq, pos


def _escape_code_point(cp: int) -> str:
    """A code point written so it means the same in a Lark string and a regex class."""
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        raise ValueError(f"invalid code point U+{cp:04X}")
    if cp < 0x80 and not chr(cp).isalnum():
        return f"\\x{cp:02x}"
    return chr(cp)


@functools.lru_cache(maxsize=4096)
def _class_bits(rx: str) -> int:
    """The character set of a class such as `[^"\\\\\\x7F\\x00-\\x1F]` (ALL if unsure)."""
    try:
        pat = re.compile(rx)
    except (re.error, OverflowError):
        return _ALL
    bits = sum(1 << c for c in range(128) if pat.fullmatch(chr(c)))
    if any(pat.fullmatch(ch) for ch in _NON_ASCII_SAMPLES):
        bits |= _NON_ASCII
    return bits


def _literal_first(value: str) -> int:
    if not value:
        return 0
    if value[0] != "\\":
        c = value[0]
    else:
        e = value[1:2]
        c = {"n": "\n", "r": "\r", "t": "\t"}.get(e) or (chr(int(value[2:4], 16)) if e == "x"
                                                         else e)
    return 1 << ord(c) if ord(c) < 128 else _NON_ASCII


class _Analysis:
    """FIRST, NULLABLE and EXT of every node, FOLLOW of every rule (fixpoints)."""

    def __init__(self, rules: dict):
        self.rules = rules
        self.first = {name: 0 for name in rules}
        self.nullable = {name: False for name in rules}
        self.ext = {name: 0 for name in rules}
        self.follow = {name: 0 for name in rules}
        self.converged = self._solve(self._rule_round) and self._solve(self._follow_round)

    @staticmethod
    def _solve(step) -> bool:
        for _ in range(_MAX_FIXPOINT_ROUNDS):
            if not step():
                return True
        return False

    def node(self, n) -> tuple[int, bool, int]:
        """(FIRST, NULLABLE, EXT) of a node under the current rule tables. EXT: the
        characters c such that some complete match s has s + c starting another
        match (an empty match counts, so a nullable node's EXT holds its FIRST)."""
        first, nullable, ext = self._node(n)
        return first, nullable, ext | (first if nullable else 0)

    def _node(self, n) -> tuple[int, bool, int]:
        if isinstance(n, LiteralNode):
            return _literal_first(n.value), not n.value, 0
        if isinstance(n, RegexNode):
            return _class_bits(n.rx), False, 0
        if isinstance(n, RuleRefNode):
            return self.first[n.name], self.nullable[n.name], self.ext[n.name]
        if isinstance(n, SequenceNode):
            first, nullable, ext = 0, True, 0
            for child in n.nodes:
                f, nl, e = self.node(child)
                if nullable:
                    first |= f
                # a complete match goes on inside `child`, or (child empty) before it
                ext = e | ((ext | f) if nl else 0)
                nullable = nullable and nl
            return first, nullable, ext
        if isinstance(n, AlternativeNode):
            first, nullable, ext = 0, False, 0
            for child in n.alternatives:
                f, nl, e = self.node(child)
                first, nullable, ext = first | f, nullable or nl, ext | e
            return first, nullable, ext
        if isinstance(n, RepetitionNode):
            f, nl, e = self.node(n.node)
            if n.max_times == 0:
                return 0, True, 0
            again = n.max_times is None or n.max_times > n.min_times
            return f, n.min_times == 0 or nl, e | (f if again else 0)
        raise ValueError(f"unexpected grammar node {type(n).__name__}")

    def _rule_round(self) -> bool:
        changed = False
        for name, rule in self.rules.items():
            f, nl, e = self.node(rule.alternatives)
            if (f, nl, e) != (self.first[name], self.nullable[name], self.ext[name]):
                self.first[name], self.nullable[name], self.ext[name] = f, nl, e
                changed = True
        return changed

    def _follow_round(self) -> bool:
        before = dict(self.follow)
        for name, rule in self.rules.items():
            self._walk(rule.alternatives, self.follow[name])
        return before != self.follow

    def _walk(self, n, after: int) -> None:
        """Add `after` (what may follow node n) to the FOLLOW of the rules inside n."""
        if isinstance(n, RuleRefNode):
            self.follow[n.name] |= after
        elif isinstance(n, SequenceNode):
            for child in reversed(n.nodes):
                self._walk(child, after)
                f, nl, _ = self.node(child)
                after = f | (after if nl else 0)
        elif isinstance(n, AlternativeNode):
            for child in n.alternatives:
                self._walk(child, after)
        elif isinstance(n, RepetitionNode):
            f, _, _ = self.node(n.node)
            again = n.max_times is None or n.max_times > 1
            self._walk(n.node, after | (f if again else 0))


def _children(n):
    for c in n.children():
        yield c
        yield from _children(c)


def _refs(rule) -> set[str]:
    return {c.name for c in _children(rule) if isinstance(c, RuleRefNode)}


def _link(rules: dict) -> None:
    for rule in rules.values():
        rule.alternatives = rule.alternatives.simplify()
    for rule in rules.values():
        for c in _children(rule):
            if isinstance(c, RuleRefNode):
                if c.name not in rules:
                    raise ValueError(f"rule '{c.name}' is used but not defined")
                c.target = rules[c.name]
    if "root" not in rules:
        raise ValueError("no 'root' rule")


def _promote(rules: dict) -> None:
    """Mark as terminals the rules over terminals whose greedy lexing loses nothing."""
    analysis = _Analysis(rules)
    refs = {name: _refs(rule) for name, rule in rules.items()}
    changed = True
    while changed:
        changed = False
        for name, rule in rules.items():
            if (name == "root" or rule.rule_is_terminal or not analysis.converged
                    or analysis.ext[name] & analysis.follow[name]):
                continue
            if all(rules[r].rule_is_terminal for r in refs[name]):
                rule.rule_is_terminal = True
                changed = True


def _rename(rules: dict) -> dict:
    """Lark names: `root` -> start, terminals UPPER_CASE, rules lower_case."""
    out = {}
    for order, rule in enumerate(rules.values()):
        rule.order = order
        if rule.name == "root":
            name = "start"
        else:
            name = re.sub(r"([a-z])([A-Z])", r"\1_\2", rule.name.replace("-", "_"))
            name = name.upper() if rule.rule_is_terminal else name.lower()
        if name in out:
            raise ValueError(f"rules '{out[name].name}' and '{rule.name}' both become "
                             f"'{name}' in Lark")
        out[name] = rule
    for name, rule in out.items():
        rule.name = name
    return out


def gbnf_to_lark(text: str) -> str:
    """A GBNF grammar as llguidance Lark; ValueError (or the parser's own error)
    when it is malformed."""
    rules = _Parser().parse(text)
    _link(rules)
    _promote(rules)
    rules = _rename(rules)
    out = ["%llguidance {}", ""]
    for rule in sorted(rules.values(), key=lambda r: r.order):
        out.append(str(rule))
    return "\n".join(out) + "\n"
