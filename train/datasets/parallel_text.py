"""The user's own parallel text: two line-aligned files, or one TSV.

    pairs = read_parallel_text(src_path="train.es", tgt_path="train.en")
    pairs = read_parallel_text(tsv_path="train.tsv")   # source<TAB>target
    pairs.src[i], pairs.tgt[i], pairs.num_empty_skipped

Paths may be local or anything `etils.epath` opens (gs://...). Errors say
what was wrong, where, and what to do:
- line counts differ -> both files and both counts;
- invalid UTF-8 -> file, line number and byte offset;
- a TSV line without exactly 2 tab-separated fields -> file and line.
Lines where either side is empty (after stripping whitespace) are skipped,
counted in `num_empty_skipped` and reported with a warning.
"""

from __future__ import annotations

import dataclasses
import logging

from etils import epath


class ParallelTextError(ValueError):
  """The user's parallel text files cannot be read as aligned pairs."""


@dataclasses.dataclass
class ParallelText:
  src: list[str]
  tgt: list[str]
  num_empty_skipped: int = 0
  empty_line_numbers: list[int] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.src)


def read_lines(path: str) -> list[str]:
  """Lines of a UTF-8 file without their line ends; fails naming the bad line."""
  try:
    data = epath.Path(path).read_bytes()
  except FileNotFoundError as e:
    raise ParallelTextError(f"Parallel text file not found: {path}") from e
  raw_lines = data.split(b"\n")
  if raw_lines and raw_lines[-1] == b"":
    raw_lines.pop()  # The file's final newline does not start a line.
  lines = []
  for number, raw in enumerate(raw_lines, start=1):
    try:
      lines.append(raw.decode("utf-8").rstrip("\r"))
    except UnicodeDecodeError as e:
      raise ParallelTextError(
          f"{path}:{number}: invalid UTF-8 (byte {e.start} of the line: "
          f"{raw[e.start:e.start + 4]!r}). Convert the file to UTF-8, e.g. "
          f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`."
      ) from e
  return lines


def _drop_empty(
    src: list[str], tgt: list[str], where: str
) -> ParallelText:
  out = ParallelText(src=[], tgt=[])
  for number, (s, t) in enumerate(zip(src, tgt), start=1):
    s, t = s.strip(), t.strip()
    if s and t:
      out.src.append(s)
      out.tgt.append(t)
    else:
      out.num_empty_skipped += 1
      out.empty_line_numbers.append(number)
  if out.num_empty_skipped:
    logging.warning(
        "%s: skipped %d line(s) with an empty side (line numbers %s%s); kept"
        " %d pairs.",
        where, out.num_empty_skipped, out.empty_line_numbers[:10],
        " ..." if out.num_empty_skipped > 10 else "", len(out),
    )
  return out


def _split_tsv(path: str, lines: list[str]) -> tuple[list[str], list[str]]:
  src, tgt = [], []
  for number, line in enumerate(lines, start=1):
    fields = line.split("\t")
    if len(fields) != 2:
      raise ParallelTextError(
          f"{path}:{number}: expected exactly 2 tab-separated fields "
          f"(source<TAB>target), found {len(fields)}: {line[:80]!r}. Remove "
          "or escape stray tabs in that line."
      )
    src.append(fields[0])
    tgt.append(fields[1])
  return src, tgt


def read_parallel_text(
    *,
    src_path: str | None = None,
    tgt_path: str | None = None,
    tsv_path: str | None = None,
) -> ParallelText:
  """Reads aligned pairs from two line-aligned files or from one TSV file."""
  if tsv_path and not (src_path or tgt_path):
    lines = read_lines(tsv_path)
    return _drop_empty(*_split_tsv(tsv_path, lines), where=tsv_path)
  if src_path and tgt_path and not tsv_path:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
      raise ParallelTextError(
          f"Parallel text files are not line-aligned: {src_path} has "
          f"{len(src)} lines but {tgt_path} has {len(tgt)} lines. Each line of "
          "the source file must translate the same line of the target file."
      )
    return _drop_empty(src, tgt, where=f"{src_path} / {tgt_path}")
  raise ParallelTextError(
      "Give either src_path and tgt_path (two line-aligned files) or tsv_path "
      f"(one source<TAB>target file); got src_path={src_path!r}, "
      f"tgt_path={tgt_path!r}, tsv_path={tsv_path!r}."
  )
