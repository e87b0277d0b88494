"""Reads verses out of installed SWORD Bible modules (Debian `sword-text-*`).

`read_module(module_id)` returns `{(osis_book, chapter, verse): raw_osis_text}`
for every non-empty verse, keyed in the module's own versification. The text
still carries its OSIS markup; `train.datasets.osis` cleans it.

pysword as shipped decompresses a whole book block for every verse it reads
(30-45 s per module); `_CachedBlocks` keeps the last decompressed block so a
module reads in about a second.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

SWORD_PATH_ENV = "SWORD_PATH"
DEFAULT_SWORD_PATH = "/usr/share/sword"

# module id -> Debian package that installs it.
PACKAGES = {
    "spaRV1909eb": "sword-text-sparv",
    "engWEB2015eb": "sword-text-web",
    "engKJV2006eb": "sword-text-kjv",
}
INSTALL_COMMAND = (
    "sudo apt-get update && sudo apt-get install -y "
    "sword-text-sparv sword-text-web sword-text-kjv"
)

VerseKey = tuple[str, int, int]  # (OSIS book id, chapter, verse), e.g. ("Gen", 1, 1)


class SwordModuleMissingError(FileNotFoundError):
  """A SWORD module the Bible corpus needs is not installed."""


def sword_path() -> str:
  """The SWORD data directory: $SWORD_PATH or /usr/share/sword."""
  return os.environ.get(SWORD_PATH_ENV, DEFAULT_SWORD_PATH)


def _missing_error(module_ids: list[str], path: str) -> SwordModuleMissingError:
  packages = " ".join(PACKAGES.get(m, "?") for m in module_ids)
  return SwordModuleMissingError(
      f"SWORD module(s) {', '.join(module_ids)} not found under {path!r} "
      f"(looked for {path}/mods.d/*.conf). They come from the Debian "
      f"package(s) {packages}. Install them with:\n  {INSTALL_COMMAND}\n"
      f"or point ${SWORD_PATH_ENV} at a directory holding mods.d/ and modules/."
  )


def _cached_blocks(bible) -> None:
  """Makes `bible` keep its most recently decompressed block in memory.

  Our own code because pysword has no option for it: its
  `_decompressed_text(testament, buf_num)` re-reads and re-inflates a whole
  book for every verse. Reading verses in order touches each block once.
  """
  original = bible._decompressed_text  # pylint: disable=protected-access
  cache: dict[tuple[str, int], bytes] = {}

  def decompressed_text(testament, buf_num):
    key = (testament, buf_num)
    if key not in cache:
      cache.clear()
      cache[key] = original(testament, buf_num)
    return cache[key]

  bible._decompressed_text = decompressed_text  # pylint: disable=protected-access


def open_modules(module_ids: list[str], path: str | None = None) -> dict:
  """Opens SWORD modules by id; fails with the apt-get command if missing.

  Returns:
    {module_id: pysword SwordBible} with block caching enabled.
  """
  path = path or sword_path()
  if not os.path.isdir(os.path.join(path, "mods.d")):
    raise _missing_error(module_ids, path)
  # Imported here: only building the dataset needs pysword, not reading it.
  from pysword import modules as pysword_modules  # pylint: disable=import-outside-toplevel
  library = pysword_modules.SwordModules(path)
  found = library.parse_modules()
  missing = [m for m in module_ids if m not in found]
  if missing:
    raise _missing_error(missing, path)
  bibles = {}
  for module_id in module_ids:
    try:
      bible = library.get_bible_from_module(module_id)
    except (IOError, OSError) as e:
      raise _missing_error([module_id], path) from e
    _cached_blocks(bible)
    bibles[module_id] = bible
  return bibles


def iter_verses(bible) -> Iterator[tuple[VerseKey, str]]:
  """Yields `((osis_book, chapter, verse), raw_text)` in canonical order."""
  structure = bible.get_structure()
  for testament, books in structure.get_books().items():
    for book in books:
      for chapter, num_verses in enumerate(book.chapter_lengths, start=1):
        indices = structure.ref_to_indicies(books=[book.name], chapters=[chapter])
        for verse, index in enumerate(indices[testament], start=1):
          text = bible._text_for_index(testament, index)  # pylint: disable=protected-access
          if text and text.strip():
            yield (book.osis_name, chapter, verse), text
        assert verse == num_verses, (book.osis_name, chapter)  # pylint: disable=undefined-loop-variable


def read_module(bible) -> dict[VerseKey, str]:
  """All non-empty verses of an opened module, keyed by (book, chapter, verse)."""
  return dict(iter_verses(bible))


def chapters(bible) -> list[tuple[str, int]]:
  """[(osis_book, chapter)] of the module's versification, in canonical order."""
  out = []
  for books in bible.get_structure().get_books().values():
    for book in books:
      out.extend((book.osis_name, c) for c in range(1, book.num_chapters + 1))
  return out
