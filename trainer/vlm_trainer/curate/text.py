"""Caption filters of the curate stage (reason `text`): pure functions, no model download.

`text_problem(caption, spec)` returns None for a caption that passes, else the name of the first check it
fails, in this order: `missing`, `word_count`, `junk_pattern` (a URL, a camera/file name such as
"IMG_0371.jpg", boilerplate such as "click here" or "untitled", or one of the spec's extra patterns),
`special_chars`, `repeated_chars`, `language` (the caption's dominant script, by `detect_script`, is not
in the allow-list). All of them count under the one reason `text` in decisions.jsonl; funnel.json
breaks them down.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from vlm_core.spec import TextFilterSpec

TEXT_CHECKS = ("missing", "word_count", "junk_pattern", "special_chars", "repeated_chars", "language")

_URL = r"(?:https?://|www\.)\S+|\b[\w-]+\.(?:com|net|org|io|html?|php)\b"
_FILE = r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg)\b|\b(?:img|dsc|dscn|dcim|pxl|screenshot)[_-]?\d+"
# Boilerplate alt text: matched anywhere, or (the second list) as the whole caption.
_BOILERPLATE_ANYWHERE = r"click here|\buntitled\b|lorem ipsum|no description|image not found|placeholder|stock photo|all rights reserved"
_BOILERPLATE_WHOLE = r"untitled|image|photo|picture|img|thumbnail|default|download|null|none|n/?a|\d+"

# unicodedata name prefixes -> script (the names accepted by filters.text.languages).
_SCRIPT_PREFIXES = (
    ("LATIN", "latin"), ("CYRILLIC", "cyrillic"), ("GREEK", "greek"), ("ARABIC", "arabic"),
    ("HEBREW", "hebrew"), ("DEVANAGARI", "devanagari"), ("THAI", "thai"), ("HANGUL", "hangul"),
    ("HIRAGANA", "kana"), ("KATAKANA", "kana"), ("CJK", "han"),
)


@lru_cache(maxsize=64)
def _junk_regex(extra: tuple[str, ...]) -> re.Pattern[str]:
    anywhere = [_URL, _FILE, _BOILERPLATE_ANYWHERE, *extra]
    return re.compile("|".join(f"(?:{p})" for p in anywhere) + rf"|^\s*(?:{_BOILERPLATE_WHOLE})\s*[.!]?\s*$",
                      re.IGNORECASE)


def _script_of(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    for prefix, script in _SCRIPT_PREFIXES:
        if name.startswith(prefix):
            return script
    return None


def detect_script(text: str) -> str | None:
    """The script most of the text's letters are written in (see spec.SCRIPTS), or None without letters."""
    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            script = _script_of(ch)
            if script is not None:
                counts[script] = counts.get(script, 0) + 1
    return max(counts, key=lambda s: counts[s]) if counts else None


def text_problem(caption: str | None, spec: TextFilterSpec) -> str | None:
    """None if the caption passes the text filter, else the first failed check (one of TEXT_CHECKS)."""
    if caption is None or not caption.strip():
        return "missing"
    words = len(caption.split())
    if not spec.min_words <= words <= spec.max_words:
        return "word_count"
    if spec.junk_patterns or spec.extra_patterns:
        extra = tuple(spec.extra_patterns)
        pattern = _junk_regex(extra) if spec.junk_patterns else re.compile("|".join(extra), re.IGNORECASE)
        if pattern.search(caption):
            return "junk_pattern"
    visible = [c for c in caption if not c.isspace()]
    special = sum(1 for c in visible if not c.isalnum())
    if visible and special / len(visible) > spec.max_special_share:
        return "special_chars"
    if re.search(rf"(.)\1{{{spec.max_repeated_chars},}}", caption):
        return "repeated_chars"
    if spec.languages and detect_script(caption) not in spec.languages:
        return "language"
    return None
