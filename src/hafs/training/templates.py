"""Prompt templates: the expert's str.format template with {context}, {instruction}, {input_section} and
{output}, checked when the config loads (template_problems) and filled for each sample (fill_template);
the Alpaca default; the system prompt for chat rows."""

from __future__ import annotations

import functools
import string

TEMPLATE_FIELDS = ("context", "instruction", "input_section", "output")
DEFAULT_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task{context}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n{input_section}\n### Response:\n{output}"
)
INPUT_CONTEXT = ", paired with an input that provides further context"


def template_problems(key: str, template: str, allowed, *, output_last: bool = False,
                      required: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Problems of a str.format template: malformed braces, unknown placeholders, format specs.

    With `output_last`, `{output}` must appear exactly once and end the template: everything after
    it would be trained as part of the response. `required`: {placeholder: what is lost without it},
    checked once the template is otherwise sound.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [(key, f"is not a valid template: {exc} (write a literal brace as '{{{{' or '}}}}')")]
    from .errors import did_you_mean

    out: list[tuple[str, str]] = []
    shown = ", ".join("{" + f + "}" for f in allowed)
    names = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    for name, spec, conv in names:
        if name not in allowed:
            out.append((key, f"unknown placeholder '{{{name}}}'{did_you_mean(name, allowed)}; allowed: {shown}"))
        elif spec or conv:
            out.append((key, f"placeholder '{{{name}}}' takes no format spec or conversion"))
    if output_last:
        count = sum(1 for name, _, _ in names if name == "output")
        if count != 1:
            out.append((key, "must contain {output} exactly once (where the response goes)"
                        if count == 0 else f"{{output}} appears {count} times; it must appear once"))
        else:
            last = max(i for i, part in enumerate(parts) if part[1] is not None)
            trailing = "".join(part[0] for part in parts[last + 1:])
            if parts[last][1] != "output" or trailing.strip():
                out.append((key, "{output} must come last: everything after it would be learned as response"))
    if not out:
        present = {name for name, _, _ in names}
        out += [(key, f"has no {{{name}}} placeholder: {lost}") for name, lost in (required or {}).items()
                if name not in present]
    return out


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> tuple[tuple[str, str | None, str, str | None], ...]:
    """(literal, field, format_spec, conversion) pieces of `template` up to `{output}`."""
    pieces = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if name == "output":
            pieces.append((literal, None, "", None))
            return tuple(pieces)
        pieces.append((literal, name, spec or "", conversion))
    raise ValueError("prompt template has no {output} placeholder")


def fill_template(template: str, instruction: str, input_text: str = "") -> str:
    """The prompt: `template` filled up to (not including) `{output}`."""
    has_input = bool(input_text.strip())
    values = {
        "instruction": instruction,
        "context": INPUT_CONTEXT if has_input else "",
        "input_section": f"\n### Input:\n{input_text}\n" if has_input else "",
    }
    out = []
    for literal, name, spec, conversion in _compiled(template):
        out.append(literal)
        if name is not None:
            value = values[name]
            if conversion:
                value = {"r": repr, "a": ascii, "s": str}[conversion](value)
            out.append(format(value, spec))
    return "".join(out)


def prompt_template(expert) -> str:
    """The expert's template, or the built-in Alpaca default."""
    return expert.prompt_template or DEFAULT_PROMPT_TEMPLATE


def system_prompt(expert) -> str:
    """System prompt injected into chat rows that have none (chat templates only)."""
    return expert.system_prompt or expert.specialization


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
