"""Structured output: constrained decoding with llguidance (JSON schemas, regexes, Lark
and GBNF grammars: constraint.py, matcher.py over the vocabulary bridge, bridge.py)
and OpenAI tool calling (tools.py: the request; toolcall.py: formats, grammars and
parsing; toolstream.py: streamed deltas)."""
from .bridge import TokenizerBridge, bridge_for, token_bytes_table
from .constraint import LIMITS, Constraint
from .matcher import (Matcher, allocate_bitmask, allowed_ids, apply_bitmask, fill_masks,
                      set_mask_threads)
from .toolcall import FORMATS, ParsedReply, ToolFormat, tool_format, tool_format_for_template
from .tools import Tool, ToolRequest, parse_tool_choice, validate_tools
from .toolstream import ToolCallStream

__all__ = ["Constraint", "FORMATS", "LIMITS", "Matcher", "ParsedReply", "Tool",
           "ToolCallStream", "ToolFormat", "ToolRequest", "TokenizerBridge",
           "allocate_bitmask", "allowed_ids", "apply_bitmask", "bridge_for", "fill_masks",
           "parse_tool_choice", "set_mask_threads", "token_bytes_table", "tool_format",
           "tool_format_for_template", "validate_tools"]
