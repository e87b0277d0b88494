#!/usr/bin/env bash
# The main job: a real Spanish->English Transformer trained on this machine.
#
#   bash experiments/quickstart.sh [--minutes N] [--workdir DIR] [--config FILE]
#
# From a fresh clone: sets up .venv and the corpus packages, builds the
# bible_es_en dataset, trains the SentencePiece tokenizer and the model
# (`small` narrowed to d_model 192) for a bounded wall time, scores the test
# split with beam search (sacreBLEU BLEU and chrF), shows held-out verses
# beside their references, and draws an attention heat map. Run it again to
# continue training in the same workdir where the last run stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=30
WORKDIR=runs/bible_es_en
CONFIG=experiments/configs/bible_es_en.py
SHOW=5
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes|--workdir|--config|--show)
      if [ $# -lt 2 ]; then echo "$1 needs a value (see --help)" >&2; exit 2; fi ;;
  esac
  case "$1" in
    --minutes) MINUTES="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --show) SHOW="$2"; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;   # the header comment
    *) echo "unknown flag: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=.venv/bin/python
step() { printf '\n=== %s\n' "$*"; }

step "1/6 set-up (virtual environment, corpus packages)"
bash experiments/setup.sh

step "2/6 the bible_es_en dataset (built once, a few seconds)"
$PY -c "
import train.datasets, tensorflow_datasets as tfds
for split in ('train', 'validation', 'test'):
    print(f'  {split:10s} {len(tfds.data_source(\"bible_es_en\", split=split)):6d} verse pairs')
" 2>&1 | grep -v -e "Generating" -e "Shuffling" -e "^\s*$" || true

step "3/6 training for up to $MINUTES minutes in $WORKDIR (tokenizer first; resumes if the workdir has a checkpoint)"
$PY -m train --config="$CONFIG" --workdir="$WORKDIR" --config.max_minutes="$MINUTES"

step "4/6 test split, beam search 4 (averaging and alpha chosen on validation)"
# Averaging the last checkpoints helps late in training and hurts early (it
# mixes in a much weaker model), and the best length penalty shifts as the
# model learns, so validation decides both, on 300 verses spread evenly
# through the 983 of the split (a third of the decoding): greedy BLEU picks
# the last checkpoint, the mean of the last 3 or (in a run that keeps one)
# the moving average of the params, then beam-4 BLEU picks alpha 1.0 or 1.4
# (the paper's 0.6 never won here: beam outputs ran short, brevity penalty
# 0.91 on validation at 0.6, 0.94 at 1.0, 0.99 at 1.4 after 1,000 steps).
# Ties keep the first. One process (train.choose) makes both choices and
# decodes the test split, so each search compiles once.
mkdir -p "$WORKDIR/eval_validation"
$PY -m train.choose --workdir="$WORKDIR" --max_sentences=300 --alphas=1.0,1.4 \
  --beam_size=4 --test_split=test | tee "$WORKDIR/eval_validation/choose.log"
CHOSEN=$(sed -n 's/^chosen: //p' "$WORKDIR/eval_validation/choose.log")
step "5/6 held-out verses (test split) beside their references ($CHOSEN)"
# Step 4's test pass wrote its translations in the split's order.
$PY - "$WORKDIR" "$SHOW" <<'EOF'
import json, pathlib, sys
from train import evaluate, inference
workdir, count = sys.argv[1], int(sys.argv[2])
choice = json.loads(pathlib.Path(workdir, "eval_validation", "choice.json").read_text())
hypotheses = pathlib.Path(choice["test"]["hypotheses_file"]).read_text(
    encoding="utf-8").split("\n")[:-1]
_, sources, references = evaluate.read_sources(workdir, split="test")
assert len(hypotheses) == len(sources), (len(hypotheses), len(sources))
count = max(0, min(count, len(sources)))
every = len(sources) // count if count else 1
shown = range(0, every * count, every)
labels = {i: f"test line {i + 1}" for i in shown}
data = inference.run_config(workdir).data
if data.name == "bible_es_en":   # verse references, book chapter:verse
    import train.datasets, tensorflow_datasets as tfds
    test = tfds.data_source("bible_es_en", split="test", data_dir=data.data_dir or None)
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    labels = {i: text(test[i]["ref"]) for i in shown}
for i in shown:
    print(f"  [{labels[i]}]\n  source:     {sources[i]}\n  model:      {hypotheses[i]}\n"
          f"  reference:  {references[i]}\n")
EOF
step "6/6 attention heat map"
echo "El animal no cruzó la calle porque estaba muy cansado." | \
  $PY -m train.translate --workdir="$WORKDIR" $CHOSEN --attention_png="$WORKDIR/attention.png"

step "the run in numbers"
$PY - "$WORKDIR" <<'EOF'
import json, pathlib, statistics, sys
from train.metrics import read_metrics   # skips a damaged line, naming it
workdir = pathlib.Path(sys.argv[1])
records = read_metrics(workdir)
rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r][1:]  # not the compile
step = max(r["step"] for r in records)
tests = sorted((workdir / "eval_test").glob("test.*.json"), key=lambda p: p.stat().st_mtime)
bleu = json.loads(tests[-1].read_text())["bleu"] if tests else float("nan")
rate = statistics.median(rates) if rates else float("nan")
print(f"  {step:,} training steps in all, at a median {rate:.2f} steps/s; test BLEU {bleu:.1f}")
print("  BLEU follows the steps, not the minutes: this shared 2-core machine runs\n"
      "  this config at ~0.75 to ~1.9 steps/s from day to day. The README's results\n"
      "  table gives the BLEU measured at each number of steps; a slow day's 30\n"
      "  minutes is ~1,300 steps, a fast day's ~3,600. To train further, run this\n"
      "  again (it resumes).")
EOF

cat <<EOF

Done.
  checkpoints and tokenizer:  $WORKDIR/
  test-set BLEU / chrF:       $WORKDIR/eval_test/
  attention heat map:         $WORKDIR/attention.png
  TensorBoard:                .venv/bin/tensorboard --logdir $WORKDIR   (pip install tensorboard)
  metrics log:                $WORKDIR/metrics.jsonl
  continue training:          bash experiments/quickstart.sh --minutes 60   (same workdir)
  translate your own text:    echo "Y dijo Dios: Sea la luz." | $PY -m train.translate --workdir=$WORKDIR
EOF
