"""OSIS markup → plain text, and the Strong's numbers a verse is tagged with.

`clean(raw)` keeps the words a reader sees in the verse: canonical titles
(Psalm superscriptions) stay, because the Spanish carries them inline in
verse 1; notes, alternative readings (`<rdg>`), speaker labels, non-canonical
headings, `¶` marks and entities go, and a glossary appended to a verse (WEB
Rev 22:21) is cut. Plain regular expressions are enough: SWORD stores each
verse as an XML fragment with unbalanced milestone tags, which an XML parser
would reject.
"""

from __future__ import annotations

import html
import re

# Elements removed together with their content. None of them nest in itself.
_DROP_ELEMENTS = re.compile(
    r"<(note|rdg|speaker)\b[^>]*>.*?</\1\s*>", flags=re.DOTALL
)
# A heading that is not part of the canonical text (e.g. KJV "ALEPH").
_NON_CANONICAL_TITLE = re.compile(
    r"<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title\s*>", flags=re.DOTALL
)
# Everything from the start of an appended glossary to the end of the verse.
_GLOSSARY = re.compile(r"<div\b[^>]*type=\"glossary\".*", flags=re.DOTALL)
# Block-level tags that separate words when removed.
_BREAKING_TAG = re.compile(r"<(?:/?title|lb|/?l|/?lg|/?div|/?p)\b[^>]*>")
_JOINED_WORDS = re.compile(r"(?<=\w)\x00+(?=\w)")
_ANY_TAG = re.compile(r"<[^>]*>")
_STRONGS = re.compile(r"strong:([HG])0*(\d+)")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:!?)\]])")


def clean(raw: str) -> str:
  """Plain verse text from one verse's OSIS fragment (may be '')."""
  text = _GLOSSARY.sub("", raw) if "glossary" in raw else raw
  # The substring tests skip regexes that cannot match: 3x faster corpus build.
  if "<note" in text or "<rdg" in text or "<speaker" in text:
    # A removed element between two words (WEB: "God<note>..</note>created")
    # leaves a space; next to punctuation it leaves nothing (see below).
    text = _DROP_ELEMENTS.sub("\x00", text)
  if "<title" in text:
    text = _NON_CANONICAL_TITLE.sub("\x00", text)
  text = _BREAKING_TAG.sub(" ", text)
  text = _ANY_TAG.sub("", text)
  if "\x00" in text:
    text = _JOINED_WORDS.sub(" ", text).replace("\x00", "")
  if "&" in text:
    text = html.unescape(text)
  text = " ".join(text.replace("¶", " ").split())
  return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def strongs_numbers(raw: str) -> set[str]:
  """The set of Strong's numbers tagged in a verse, e.g. {"H7225", "H430"}.

  Notes are removed first so that a footnote's tags do not count.
  """
  text = _GLOSSARY.sub("", raw) if "glossary" in raw else raw
  if "<note" in text or "<rdg" in text:
    text = _DROP_ELEMENTS.sub("", text)
  return {p + n for p, n in _STRONGS.findall(text)}
