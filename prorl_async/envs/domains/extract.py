"""Finding the answer in a response: answer tags, ``\\boxed{}``, code blocks, choice letters, numbers.

Pure string functions: they run on every sample and must be fast (linear in the text) and total (any
string in, ``None`` when there is no answer, never an exception).

Tolerated variants, in order of preference:

- ``<answer>X</answer>`` (last one wins; case-insensitive tag), or an unclosed ``<answer>X`` at the end
  (generation stopped at the ``</answer>`` stop string, or the prefill opened the tag);
- ``\\boxed{X}`` (last one; nested braces; ``\\fbox``), also inside an answer tag;
- a last line ``Answer: X`` / ``The (final) answer is X``, also inside an answer tag;
- a reasoning model's ``<think>...</think>`` is dropped first (an unclosed one means no answer yet).

Then :func:`clean` strips wrappers a model adds around a short answer: ``$...$``, ``\\(...\\)``,
``**...**``, backticks, ``\\text{}``, a trailing period, and reads a typographic minus as ``-``.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_ANSWER_CHARS = 4000
"""Longer candidate answers are treated as no answer (protects slow verifiers from huge inputs)."""

_TAG_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_TAG_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FINAL_LINE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:)\s*:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE
)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?\d+\s*/\s*\d+")


def ask_for(answer_format: str, noun: str = "ANSWER") -> str:
    """The sentence that tells the model how to state its final answer."""
    if answer_format == "boxed":
        return f"Put your final {noun.lower()} in \\boxed{{}}."
    return f"Reply in the form <answer>{noun}</answer>."


def strip_thinking(text: str) -> str:
    """The part after a closed ``<think>...</think>``; empty if thinking never ended."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return ""
    return text


def answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, or of a final unclosed ``<answer>``.

    Linear time: tag positions are found once (a lazy ``<answer>(.*?)</answer>`` regex is quadratic on
    a response with many opening tags and no closing one).
    """
    opens = [m.end() for m in _TAG_OPEN.finditer(text)]
    closes = [m.start() for m in _TAG_CLOSE.finditer(text)]
    if not opens:  # "7</answer>": the opening tag was a prefill the caller left out
        return text[: closes[0]] if closes else None
    if closes and closes[-1] >= opens[-1]:
        return text[opens[-1] : closes[-1]]
    return text[opens[-1]:]  # unclosed: the tag was left open by the prefill or a stop string


def boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance, or None (one pass over the text)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    closing: dict[int, int] = {}
    stack: list[int] = []
    for i in range(starts[0] - 1, len(text)):
        if text[i] == "{":
            stack.append(i)
        elif text[i] == "}" and stack:
            closing[stack.pop()] = i
    for start in reversed(starts):
        if start - 1 in closing:
            return text[start : closing[start - 1]]
    return None


def final_line(text: str) -> str | None:
    """``X`` from a last ``Answer: X`` / ``The final answer is X`` line."""
    matches = _FINAL_LINE.findall(text)
    return matches[-1] if matches else None


def final_answer(text: str, answer_format: str = "answer_tag") -> str | None:
    """The model's final answer, cleaned, from ``text`` (which includes the prefill); None if absent."""
    body = strip_thinking(text)
    first, second = (answer_tag, boxed) if answer_format == "answer_tag" else (boxed, answer_tag)
    candidate = first(body)
    if candidate is None:
        candidate = second(body)
    if candidate is None:
        candidate = final_line(body)
    if candidate is None:
        return None
    inner = boxed(candidate)
    if inner is None:  # "<answer>The answer is 12</answer>"
        inner = final_line(candidate)
    cleaned = clean(inner if inner is not None else candidate)
    return cleaned if cleaned and len(cleaned) <= MAX_ANSWER_CHARS else None


def clean(answer: str) -> str:
    """Strip the wrappers models put around a short answer; keeps inner whitespace (grids, lists)."""
    text = answer.strip().replace("\u2212", "-")  # a typographic minus is still a minus
    for _ in range(3):
        before = text
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`")):
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left):-len(right)].strip()
        match = re.fullmatch(r"\\text\{(.*)\}", text, re.DOTALL)
        if match:
            text = match.group(1).strip()
        if text.endswith(".") and not text.endswith("..") and "\n" not in text:
            text = text[:-1].rstrip()
        if text == before:
            break
    return text


def parse_number(text: str) -> Fraction | None:
    """An exact number from ``7``, ``-3.50``, ``1,000``, ``3/4``, ``1e3``, ``x = 7``; None otherwise."""
    candidate = text.strip()
    if "=" in candidate:  # "4 + 3 = 7" or "x = 7": the value is what comes last
        candidate = candidate.rsplit("=", 1)[1].strip()
    candidate = clean(candidate).replace(",", "").replace(" ", "") if candidate else candidate
    if not candidate or len(candidate) > 64 or not _NUMBER.fullmatch(candidate):
        return None
    try:
        return Fraction(candidate)
    except (ValueError, ZeroDivisionError):
        return None


def code_block(text: str, name: str | None = None) -> str | None:
    """Python source from a response: the last fenced block defining ``name`` (else the last block),
    inside an answer tag if there is one; the bare text when there is no fence."""
    body = strip_thinking(text)
    tagged = answer_tag(body)
    region = tagged if tagged is not None else body
    blocks = [code for lang, code in _FENCE.findall(region) if lang.lower() in ("", "python", "py", "python3")]
    if blocks:
        defining = [b for b in blocks if name and re.search(rf"def\s+{re.escape(name)}\s*\(", b)]
        return (defining or blocks)[-1]
    stripped = region.strip("\n")
    return stripped if stripped.strip() else None


def choice_letter(text: str, answer_format: str, choices: list[str] | None = None, letters: str = "ABCD") -> str | None:
    """One choice letter from ``B``, ``(b)``, ``B.``, ``(B) text``, ``**B**``, ``The answer is B`` or the
    text of a choice; None when absent or ambiguous (several distinct letters standing alone)."""
    candidate = final_answer(text, answer_format)
    if candidate is None:
        return None
    for letter, choice in zip(letters, choices or [], strict=False):
        if candidate.casefold() == clean(choice).casefold():
            return letter
    short = re.fullmatch(rf"\(?([{letters}])\)?[.:)]?", candidate, re.IGNORECASE)
    if short:
        return short.group(1).upper()
    lead = re.match(rf"(?:\(([{letters}])\)|([{letters}])[.:)])\s", candidate)
    if lead:
        return lead.group(1) or lead.group(2)
    found = set(re.findall(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z])", candidate))
    return found.pop() if len(found) == 1 else None
