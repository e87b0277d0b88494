"""The `bible_es_en` tfds dataset: sizes, split rule, leakage, clean text."""

import collections
import re
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from train.datasets import bible_alignment, osis, sword

SIZE_BOUNDS = {
    "train": (28_500, 29_100),
    "validation": (950, 1_020),
    "test": (1_030, 1_100),
}


@pytest.fixture(scope="module")
def splits(bible_data_dir):
  out = {}
  for split in SIZE_BOUNDS:
    source = tfds.data_source("bible_es_en", split=split, data_dir=bible_data_dir)
    out[split] = [
        {k: v.decode("utf-8") for k, v in r.items()}
        for r in source.__getitems__(list(range(len(source))))
    ]
  return out


@pytest.fixture(scope="module")
def kjv_chapter_index():
  bibles = sword.open_modules([bible_alignment.KJV])
  return {c: i for i, c in enumerate(sword.chapters(bibles[bible_alignment.KJV]))}


def test_split_sizes(splits):
  sizes = {k: len(v) for k, v in splits.items()}
  print("bible_es_en split sizes:", sizes)
  for split, (low, high) in SIZE_BOUNDS.items():
    assert low <= sizes[split] <= high, (split, sizes[split])


def test_splits_follow_chapter_rule(splits, kjv_chapter_index):
  assert len(kjv_chapter_index) == 1189
  for split, examples in splits.items():
    residues = {
        kjv_chapter_index[bible_alignment.parse_ref(e["ref"])[:2]] % 30
        for e in examples
    }
    if split == "test":
      assert residues == {15}
    elif split == "validation":
      assert residues == {0}
    else:
      assert not residues & {0, 15}
      assert len(residues) == 28


def test_refs_unique_and_in_canonical_order(splits, kjv_chapter_index):
  refs = [e["ref"] for examples in splits.values() for e in examples]
  assert len(refs) == len(set(refs))
  test_chapters = [
      kjv_chapter_index[bible_alignment.parse_ref(e["ref"])[:2]]
      for e in splits["test"]
  ]
  assert test_chapters == sorted(test_chapters)
  assert splits["validation"][0]["ref"] == "Gen 1:1"


def test_no_eval_source_in_train_except_true_duplicates(splits):
  """A held-out Spanish verse may equal a train verse only if the Bible itself
  repeats it: the module holds the identical text at both references."""
  train_refs = collections.defaultdict(list)
  for e in splits["train"]:
    train_refs[e["es"]].append(e["ref"])
  spanish = sword.open_modules([bible_alignment.SPANISH])[bible_alignment.SPANISH]
  raw = sword.read_module(spanish)
  held_out = splits["validation"] + splits["test"]
  overlaps = [(e, train_refs[e["es"]]) for e in held_out if e["es"] in train_refs]
  print(f"{len(overlaps)} held-out sources repeat a train source (true duplicates)")
  assert len(overlaps) <= 0.01 * len(held_out)
  for example, refs in overlaps:
    for ref in refs:
      assert ref != example["ref"]
      text_here = osis.clean(raw[bible_alignment.parse_ref(example["ref"])])
      text_there = osis.clean(raw[bible_alignment.parse_ref(ref)])
      # The dataset truecases chapter openings ("Y HABLÓ Jehová" at a
      # chapter's start repeats "Y habló Jehová" elsewhere): equal up to case.
      assert text_here.lower() == text_there.lower() == example["es"].lower()


def test_no_markup_left(splits):
  markup = re.compile(r"[<>¶]|strong:|lemma=|&\w+;|\b[HG]\d{3,5}\b")
  for examples in splits.values():
    for e in examples:
      for lang in ("es", "en"):
        assert e[lang] == e[lang].strip() and e[lang]
        assert not markup.search(e[lang]), (e["ref"], e[lang])


def test_glossary_cut_and_canonical_titles_kept(splits):
  by_ref = {e["ref"]: e for examples in splits.values() for e in examples}
  last = by_ref["Rev 22:21"]["en"]
  assert last == "The grace of the Lord Jesus Christ be with all the saints. Amen."
  assert "Glossary" not in last
  # Psalm superscriptions: inline in the Spanish, a canonical title in WEB.
  assert by_ref["Ps 3:1"]["en"].startswith("A Psalm by David, when he fled")
  assert by_ref["Ps 3:1"]["es"].startswith("Salmo de David")


def test_osis_clean_separates_words_around_removed_notes():
  raw = ('<w lemma="strong:H0430">God</w><note placement="foot">A note.</note>'
         '<w lemma="strong:H1254">created</w> it<note>x</note>. '
         '<title>HEADING</title>&amp; ¶ more')
  assert osis.clean(raw) == "God created it. & more"
  assert osis.strongs_numbers(raw) == {"H430", "H1254"}


def test_missing_modules_error_names_packages_and_command(tmp_path):
  with pytest.raises(sword.SwordModuleMissingError) as err:
    sword.open_modules(list(bible_alignment.MODULES), str(tmp_path))
  message = str(err.value)
  assert "sword-text-sparv sword-text-web sword-text-kjv" in message
  assert (
      "sudo apt-get install -y sword-text-sparv sword-text-web sword-text-kjv"
      in message
  )
  # Only one module installed: the error names the missing ones.
  (tmp_path / "mods.d").mkdir()
  (tmp_path / "mods.d" / "engkjv2006eb.conf").write_text(
      "[engKJV2006eb]\nDataPath=./modules/texts/ztext/engKJV2006eb/\n"
      "ModDrv=zText\n"
  )
  with pytest.raises(sword.SwordModuleMissingError, match="spaRV1909eb") as err:
    sword.open_modules(list(bible_alignment.MODULES), str(tmp_path))
  assert "sword-text-sparv" in str(err.value)


def test_data_source_by_name_from_the_shell(bible_data_dir, splits):
  code = (
      "import train.datasets, tensorflow_datasets as tfds; "
      f"print(len(tfds.data_source('bible_es_en', split='test', "
      f"data_dir={bible_data_dir!r})))"
  )
  out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True,
      timeout=120,
  )
  assert out.stdout.strip().splitlines()[-1] == str(len(splits["test"]))


def test_truecase_opening_uses_corpus_casing():
  counts = bible_alignment.casing_counts(
      ["y fueron los cielos", "dijo Jehová", "la empero", "Jehová es"])
  cases = {
      "Y FUERON acabados": "Y fueron acabados",
      "Y JEHOVÁ dijo á Noé": "Y Jehová dijo á Noé",
      "EMPERO la serpiente": "Empero la serpiente",
      "ERA entonces": "Era entonces",         # unseen: lower-cased
      "¿QUIÉN es?": "¿Quién es?",
      "Y dijo Dios": "Y dijo Dios",           # nothing upper-cased
      "A Dios": "A Dios",
      "": "",
  }
  for text, want in cases.items():
    assert bible_alignment.truecase_opening(text, counts) == want, text


def test_chapter_openings_truecased_in_the_dataset(splits):
  by_ref = {e["ref"]: e for examples in splits.values() for e in examples}
  assert by_ref["Gen 2:1"]["es"].startswith("Y fueron acabados los cielos")
  leading_caps = re.compile(r"^\W*(?:\w\W+)?[A-ZÁÉÍÓÚÑ]{2,}\b")
  assert not [e["ref"] for examples in splits.values() for e in examples
              if leading_caps.match(e["es"])]


@pytest.mark.slow
def test_two_processes_building_at_once_both_succeed(tmp_path):
  # Without the build lock in train/datasets/sources.py, the second of two
  # first-use builds into one data_dir fails renaming its temporary
  # directory onto the finished one (FileExistsError).
  code = (
      "import sys; from experiments import configs; "
      "from train.datasets import sources; "
      "c = configs.data_config(); c.data_dir = sys.argv[1]; "
      "print(len(sources.get_source(c, 'test')))"
  )
  procs = [
      subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for _ in range(2)
  ]
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "1063"


def test_reading_prepared_data_does_not_import_pysword(bible_data_dir):
  """Only building needs pysword: a host with the data prepared may lack it."""
  script = (
      "import sys; sys.modules['pysword'] = None\n"  # any `import pysword` fails
      "from experiments import configs\n"
      "from train.datasets import sources\n"
      "config = configs.data_config(); config.data_dir = sys.argv[1]\n"
      "source = sources.get_source(config, 'test')\n"
      "print(len(source), 'pysword' in sys.modules and sys.modules['pysword'] is not None)\n"
  )
  out = subprocess.run([sys.executable, "-c", script, bible_data_dir],
                       capture_output=True, text=True, check=True, timeout=300)
  count, imported = out.stdout.split()
  assert int(count) > 1000 and imported == "False"
