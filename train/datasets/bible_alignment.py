"""Aligns Spanish (RV1909) and English (WEB) verses and splits them by chapter.

The rules are the measured ones of the project's CORPUS.md:
- pair verses by (book, chapter, verse) key in KJV versification;
- keep a pair only when the Strong's-number overlap (Dice) of the Spanish and
  the KJV verse is >= 0.3 and the character-length ratios es/WEB and WEB/KJV
  are both within [0.5, 2]; this drops the verses that Spanish Hebrew-numbered
  chapters and merged verses put out of step (WEB's own Strong's tags are
  unusable, KJV stands in for it);
- number the 1,189 KJV chapters in canonical order from 0 (Gen 1 = 0,
  Rev 22 = 1188): index % 30 == 0 -> validation, == 15 -> test, else train.
  Counting every chapter, not just kept ones, keeps the split stable when the
  filter changes, and whole chapters never straddle splits;
- truecase upper-cased words opening a Spanish verse, in practice the first
  verse of each chapter ("Y FUERON acabados" -> "Y fueron acabados", "EMPERO
  la" -> "Empero la"), from word counts of the Spanish training verses.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re

from train.datasets import osis
from train.datasets import sword

SPANISH, ENGLISH, KJV = "spaRV1909eb", "engWEB2015eb", "engKJV2006eb"
MODULES = (SPANISH, ENGLISH, KJV)

MIN_DICE = 0.3
LENGTH_RATIO_RANGE = (0.5, 2.0)
SPLIT_PERIOD = 30
VALIDATION_RESIDUE = 0
TEST_RESIDUE = 15

_REF = re.compile(r"^(\S+) (\d+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class VersePair:
  ref: str  # "Gen 1:1"
  chapter_index: int  # 0-based index of the chapter among all 1,189
  es: str
  en: str


def format_ref(key: sword.VerseKey) -> str:
  book, chapter, verse = key
  return f"{book} {chapter}:{verse}"


def parse_ref(ref: str) -> sword.VerseKey:
  """"Gen 1:1" -> ("Gen", 1, 1)."""
  match = _REF.match(ref)
  if not match:
    raise ValueError(f"Not a verse reference like 'Gen 1:1': {ref!r}")
  return match.group(1), int(match.group(2)), int(match.group(3))


def split_of_chapter(chapter_index: int) -> str:
  """'train', 'validation' or 'test' for a 0-based chapter index."""
  residue = chapter_index % SPLIT_PERIOD
  if residue == VALIDATION_RESIDUE:
    return "validation"
  if residue == TEST_RESIDUE:
    return "test"
  return "train"


def dice(a: set[str], b: set[str]) -> float:
  """Dice overlap 2|a∩b| / (|a|+|b|); 0 when both are empty."""
  if not a and not b:
    return 0.0
  return 2 * len(a & b) / (len(a) + len(b))


def _ratio_ok(a: str, b: str) -> bool:
  low, high = LENGTH_RATIO_RANGE
  return low <= len(a) / len(b) <= high


_WORD = re.compile(r"\w+")


def _is_upper_word(word: str) -> bool:
  return word.isupper() and len(word) > 1


def casing_counts(texts) -> dict[str, collections.Counter]:
  """lower-cased word -> Counter of its spellings, upper-cased words excluded."""
  counts = collections.defaultdict(collections.Counter)
  for text in texts:
    for word in _WORD.findall(text):
      if not _is_upper_word(word):
        counts[word.lower()][word] += 1
  return counts


def truecase_opening(text: str, counts: dict[str, collections.Counter]) -> str:
  """The upper-cased words at the start of a verse, in their usual casing.

  The leading words (up to the first one not all capitals) take their most
  frequent spelling in ``counts``; the first keeps a capital initial. A word
  the counts never saw is lower-cased (capitalised if first). Known limits:
  the counts include verse-initial spellings, so a word that mostly opens
  verses keeps its capital after a leading "Y" (5 of 1,189 chapter openings,
  e.g. "Y Tornéme"), and a one-letter word inside the run ends it.
  """
  words = list(_WORD.finditer(text))
  # A one-letter first word ("Y", "A") belongs to the run only when an
  # upper-cased word follows it.
  start = 1 if (len(words) > 1 and len(words[0].group()) == 1
                and words[0].group().isupper()) else 0
  run = []
  for match in words[start:]:
    if not _is_upper_word(match.group()):
      break
    run.append(match)
  for match in reversed(run):
    word = match.group()
    seen = counts.get(word.lower())
    cased = seen.most_common(1)[0][0] if seen else word.lower()
    if match is words[0]:
      cased = cased[:1].upper() + cased[1:]
    text = text[:match.start()] + cased + text[match.end():]
  return text


def aligned_pairs(sword_dir: str | None = None) -> dict[str, list[VersePair]]:
  """Reads, cleans, aligns and filters the corpus.

  Returns:
    {"train"|"validation"|"test": [VersePair, ...]} in canonical verse order.
  """
  bibles = sword.open_modules(list(MODULES), sword_dir)
  raw = {m: sword.read_module(b) for m, b in bibles.items()}
  chapter_index = {c: i for i, c in enumerate(sword.chapters(bibles[KJV]))}
  splits = {"train": [], "validation": [], "test": []}
  seen = dropped = 0
  for key, kjv_raw in raw[KJV].items():  # canonical KJV order
    es_raw, en_raw = raw[SPANISH].get(key), raw[ENGLISH].get(key)
    if es_raw is None or en_raw is None:
      continue
    es, en, kjv = osis.clean(es_raw), osis.clean(en_raw), osis.clean(kjv_raw)
    if not (es and en and kjv):
      continue
    seen += 1
    keep = (
        dice(osis.strongs_numbers(es_raw), osis.strongs_numbers(kjv_raw))
        >= MIN_DICE
        and _ratio_ok(es, en)
        and _ratio_ok(en, kjv)
    )
    if not keep:
      dropped += 1
      continue
    index = chapter_index[key[:2]]
    pair = VersePair(format_ref(key), index, es, en)
    splits[split_of_chapter(index)].append(pair)
  counts = casing_counts(pair.es for pair in splits["train"])
  splits = {name: [dataclasses.replace(p, es=truecase_opening(p.es, counts))
                   for p in pairs] for name, pairs in splits.items()}
  logging.info(
      "bible_es_en: %d verse pairs non-empty on both sides, %d dropped by the"
      " alignment filter, kept %s",
      seen, dropped, {k: len(v) for k, v in splits.items()},
  )
  return splits
