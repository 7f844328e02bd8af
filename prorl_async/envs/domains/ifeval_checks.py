"""Offline checkers for IFEval's instruction types, following Google's reference checks (strict mode).

Differences from the reference, all because nltk data and langdetect are unavailable offline:
- sentences are split with a regex heuristic (abbreviations, decimals, initials kept together) instead of
  nltk punkt, and words are ``\\w+`` runs (as the reference's word counter does);
- ``change_case:english_*`` check the case only (the reference also asks langdetect for "en");
- ``language:response_language`` checks the writing system: at least 60% of the letters must be in the
  script of the language. Languages written in Latin script cannot be told from English that way, so
  :func:`supported` reports them unsupported and the task list leaves those prompts out.

``CHECKS[instruction_id](response, **kwargs) -> bool``; unknown kwargs are ignored (None values too).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable

_RELATIONS = {"less than": lambda n, k: n < k, "at least": lambda n, k: n >= k}
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Ltd|Co|vs|etc|e\.g|i\.e|Ph\.D)\.$", re.IGNORECASE)
# Unicode ranges of scripts that identify a language (or a small family of languages).
_SCRIPTS = {
    "ar": "\u0600-\u06ff", "fa": "\u0600-\u06ff", "ur": "\u0600-\u06ff",
    "hi": "\u0900-\u097f", "mr": "\u0900-\u097f", "ne": "\u0900-\u097f",
    "bn": "\u0980-\u09ff", "pa": "\u0a00-\u0a7f", "gu": "\u0a80-\u0aff", "ta": "\u0b80-\u0bff",
    "te": "\u0c00-\u0c7f", "kn": "\u0c80-\u0cff", "ml": "\u0d00-\u0d7f", "th": "\u0e00-\u0e7f",
    "ru": "\u0400-\u04ff", "bg": "\u0400-\u04ff", "uk": "\u0400-\u04ff", "he": "\u0590-\u05ff",
    "ko": "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f", "ja": "\u3040-\u30ff\u4e00-\u9fff",
    "zh": "\u4e00-\u9fff",
}


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def split_sentences(text: str) -> list[str]:
    """Sentences end at ``.``, ``!`` or ``?`` (runs of them) followed by space or the end, except after an
    abbreviation, a single letter (``J. Smith``, ``p.m.``) or inside a number (``3.5``)."""
    sentences, start = [], 0
    flat = " ".join(text.split())
    for match in re.finditer(r"[.!?]+(?=[\"'”’)\]]*(?:\s|$))", flat):
        piece = flat[start:match.end()]
        if _ABBREVIATION.search(piece) or re.search(r"(?:^|[\s.])[A-Za-z]\.$", piece):  # J. Smith, p.m., U.S.
            continue
        sentences.append(piece.strip())
        start = match.end()
    tail = flat[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def _relation(value: int, relation: str, threshold: int) -> bool:
    return _RELATIONS[relation](value, threshold)


def _paragraphs_stars(text: str) -> list[str] | None:
    parts = re.split(r"\s?\*\*\*\s?", text)
    for i, part in enumerate(parts):
        if not part.strip() and 0 < i < len(parts) - 1:
            return None  # an empty paragraph in the middle breaks the format
    return [p for p in parts if p.strip()]


def _nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = [p for p in re.split(r"\n\n", text) if p.strip()]
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0]
    return word.lower() == first_word.lower()


def _json(text: str) -> bool:
    body = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(prefix)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _highlights(text: str, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def _postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker.upper() == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker.upper() == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.search(pattern, text.lower(), flags=re.MULTILINE))


def _two_responses(text: str) -> bool:
    parts = text.split("******")
    for i, part in enumerate(parts):
        if not part.strip() and 0 < i < len(parts) - 1:
            return False
    valid = [p.strip() for p in parts if p.strip()]
    return len(valid) == 2 and valid[0] != valid[1]


def _language(text: str, language: str) -> bool:
    script = _SCRIPTS.get(language)
    letters = [c for c in text if c.isalpha()]
    if script is None or not letters:
        return False
    inside = sum(bool(re.match(f"[{script}]", c)) for c in letters)
    return inside >= 0.6 * len(letters)


CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": lambda t, keywords: all(re.search(re.escape(k), t, re.IGNORECASE) for k in keywords),
    "keywords:frequency": lambda t, keyword, frequency, relation: _relation(
        len(re.findall(re.escape(keyword.strip()), t, re.IGNORECASE)), relation, frequency),
    "keywords:forbidden_words": lambda t, forbidden_words: not any(
        re.search(r"\b" + re.escape(w) + r"\b", t, re.IGNORECASE) for w in forbidden_words),
    "keywords:letter_frequency": lambda t, letter, let_frequency, let_relation: _relation(
        Counter(t.lower())[letter.lower()], let_relation, let_frequency),
    "language:response_language": lambda t, language: _language(t, language),
    "length_constraints:number_sentences": lambda t, num_sentences, relation: _relation(
        len(split_sentences(t)), relation, num_sentences),
    "length_constraints:number_paragraphs": lambda t, num_paragraphs: (
        (p := _paragraphs_stars(t)) is not None and len(p) == num_paragraphs),
    "length_constraints:number_words": lambda t, num_words, relation: _relation(count_words(t), relation, num_words),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": lambda t, num_placeholders: (
        len(re.findall(r"\[.*?\]", t)) >= num_placeholders),
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda t, num_bullets: (
        len(re.findall(r"^\s*\*[^*].*$", t, re.MULTILINE)) + len(re.findall(r"^\s*-.*$", t, re.MULTILINE))
        == num_bullets),
    "detectable_format:constrained_response": lambda t: any(
        option in t.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": lambda t, section_spliter, num_sections: (
        len(re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", t)) - 1 >= num_sections),
    "detectable_format:json_format": _json,
    "detectable_format:title": lambda t: any(m.strip("<>").strip() for m in re.findall(r"<<[^\n]+>>", t)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda t, prompt_to_repeat: (
        t.strip().lower().startswith(prompt_to_repeat.strip().lower())),
    "startend:end_checker": lambda t, end_phrase: t.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda t: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda t, capital_frequency, capital_relation: _relation(
        sum(w.isupper() for w in re.findall(r"\w+", t)), capital_relation, capital_frequency),
    "change_case:english_capital": lambda t: t.isupper(),
    "change_case:english_lowercase": lambda t: t.islower(),
    "punctuation:no_comma": lambda t: "," not in t,
}


def supported(instruction_id: str, kwargs: dict) -> bool:
    """Whether this instruction can be checked offline (see the module docstring)."""
    if instruction_id == "language:response_language":
        return kwargs.get("language") in _SCRIPTS
    return instruction_id in CHECKS


def check(instruction_id: str, kwargs: dict, response: str) -> bool:
    """Whether ``response`` follows one instruction (kwargs from the IFEval record)."""
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    return bool(CHECKS[instruction_id](response, **args))
