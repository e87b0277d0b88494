"""Bad input and damaged files: a clear message, exit status 2, nothing lost.

Each usage mistake of the commands must print one or two lines (never a
traceback) naming the flag and value, exit 2, and be caught before the model
loads (``inference.load`` is made to fail if it is called). A damaged newest
checkpoint is skipped, named, and left in place. The workdirs are real: a
SentencePiece model and Orbax checkpoints of the tiny model
(tests/test_evaluate.py's ``make_workdir``).
"""

import hashlib
import io
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_evaluate import SOURCES, TARGETS, make_workdir  # tests/ is on sys.path
from test_trainer import ENV as TRAIN_ENV  # the training children's environment
from train import choose, evaluate, inference, inspect as inspect_cli
from train import translate
from train import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("errors_workdir"))[0]


@pytest.fixture
def no_loading(monkeypatch):
  """Fails the test if a command loads a model."""
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the usage error")
  monkeypatch.setattr(inference, "load", refuse)


def checksums(root) -> dict[str, str]:
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def run_evaluate(args, capsys):
  code = cli.run_command(evaluate.main, ["evaluate", *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def run_translate(args, stdin=b"Luz.\n"):
  out, err = io.StringIO(), io.StringIO()
  code = translate.run(["translate", *args], io.BytesIO(stdin), out, err)
  return code, out.getvalue(), err.getvalue()


def assert_usage_error(code, err, *needles):
  assert code == 2, err
  lines = err.strip().splitlines()
  assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in err, (needle, err)


# ---------------------------------------------------------------- usage errors

@pytest.mark.parametrize("args, needles", [
    (["--workdir=/nonexistent/run"], ["--workdir=/nonexistent/run",
                                      "no such directory"]),
    (["--checkpoint=999999"], ["--checkpoint=999999", "steps: [10, 20, 30]"]),
    (["--checkpoint=last"], ["--checkpoint='last'", "latest, best"]),
    (["--beam_size=0"], ["--beam_size=0"]),
    (["--alpha=-0.5"], ["--alpha=-0.5", ">= 0"]),
    (["--batch_size=0"], ["--batch_size=0"]),
    (["--average_last=-1"], ["--average_last=-1"]),
    (["--split=bogus"], ["--split=bogus", "validation or test"]),
    (["--reference=ref.txt"], ["--reference needs --input"]),
    (["--input=/nonexistent/src.txt"], ["/nonexistent/src.txt"]),
    (["--decoding=sample"], ["--decoding"]),
    (["--bogus_flag=1"], ["bogus_flag"]),
    (["--ema"], ["--ema", "kept no moving average", "ema_decay"]),
    (["--decode_devices=-1"], ["--decode_devices=-1", ">= 1"]),
    (["--decode_devices=64"], ["--decode_devices=64", "has 1 cpu device"]),
])
def test_evaluate_usage_errors(workdir, no_loading, capsys, args, needles):
  if not any(a.startswith("--workdir") for a in args):
    args = [f"--workdir={workdir}", *args]
  code, out, err = run_evaluate(args, capsys)
  assert_usage_error(code, err, *needles)
  assert out == ""


@pytest.mark.parametrize("args, needles", [
    ([], ["--workdir is required"]),
    (["--workdir=/nonexistent/run"], ["/nonexistent/run"]),
    (["--alphas=1.0,x"], ["--alphas=1.0,x", "numbers >= 0"]),
    (["--alphas=-1"], ["--alphas=-1", ">= 0"]),
    (["--alphas="], ["--alphas", "at least one"]),
    (["--bogus_flag=1"], ["bogus_flag"]),
    (["--decode_devices=-1"], ["--decode_devices=-1", ">= 1"]),
    (["--beam_size=0"], ["--beam_size=0"]),
    (["--max_sentences=-1"], ["--max_sentences=-1"]),
    (["--split=bogus"], ["--split=bogus", "validation or test"]),
    (["--test_split=bogus"], ["--test_split=bogus", "validation or test"]),
])
def test_choose_usage_errors(workdir, no_loading, capsys, args, needles):
  if args and not args[0].startswith("--workdir"):
    args = [f"--workdir={workdir}", *args]
  code = cli.run_command(choose.main, ["choose", *args])
  captured = capsys.readouterr()
  assert_usage_error(code, captured.err, *needles)
  assert captured.out == ""


def test_evaluate_empty_workdir_and_missing_reference(tmp_path, workdir,
                                                      no_loading, capsys):
  code, _, err = run_evaluate([f"--workdir={tmp_path}"], capsys)
  assert_usage_error(code, err, "no checkpoint in", "train first")
  src = tmp_path / "src.txt"
  src.write_text("\n".join(SOURCES) + "\n")
  code, _, err = run_evaluate([f"--workdir={workdir}", f"--input={src}",
                               f"--reference={tmp_path / 'missing.txt'}"],
                              capsys)
  assert_usage_error(code, err, "missing.txt")


def test_evaluate_checks_line_counts_and_output_dir_first(
    workdir, tmp_path, no_loading, capsys):
  src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
  src.write_text("\n".join(SOURCES) + "\n")
  ref.write_text("\n".join(TARGETS[:-1]) + "\n")
  code, _, err = run_evaluate([f"--workdir={workdir}", f"--input={src}",
                               f"--reference={ref}"], capsys)
  assert_usage_error(code, err, "6 lines", "has 5", "line-aligned")
  ref.write_text("\n".join(TARGETS) + "\n")
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  if os.access(read_only, os.W_OK):  # root ignores the mode bits
    read_only = pathlib.Path("/proc/version")  # a file: no directory there
  code, _, err = run_evaluate([f"--workdir={workdir}", f"--input={src}",
                               f"--reference={ref}",
                               f"--output_dir={read_only}"], capsys)
  assert_usage_error(code, err, f"--output_dir={read_only}", "not writable")


def test_evaluate_prints_scores_when_writing_fails(workdir, tmp_path, capsys,
                                                   monkeypatch):
  src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
  src.write_text("\n".join(SOURCES) + "\n")
  ref.write_text("\n".join(TARGETS) + "\n")
  from etils import epath

  def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(epath.Path, "write_text", disk_full)
  code, out, err = run_evaluate([
      f"--workdir={workdir}", f"--input={src}", f"--reference={ref}",
      "--decoding=greedy", "--max_extra_len=4", "--batch_size=8",
      f"--output_dir={tmp_path / 'out'}"], capsys)
  assert code == 1
  assert "BLEU = " in out and "chrF2" in out       # the scores survive
  assert "No space left on device" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needles", [
    (["--workdir=/nonexistent/run"], ["no such directory"]),
    (["--checkpoint=999999"], ["--checkpoint=999999"]),
    (["--beam_size=0"], ["--beam_size=0"]),
    (["--alpha=-1"], ["--alpha=-1"]),
    (["--decoding=sample", "--temperature=0"], ["--temperature=0"]),
    (["--input=/nonexistent/in.txt"], ["--input=/nonexistent/in.txt"]),
    (["--decode_devices=64"], ["--decode_devices=64", "has 1 cpu device"]),
])
def test_translate_usage_errors(workdir, no_loading, args, needles):
  if not any(a.startswith("--workdir") for a in args):
    args = [f"--workdir={workdir}", *args]
  code, out, err = run_translate(args)
  assert_usage_error(code, err, *needles)
  assert out == ""


def test_inspect_usage_errors(workdir, no_loading, capsys):
  for args, needle in ((["--nearest=luz"], "--workdir is required"),
                       ([f"--workdir={workdir}"], "--nearest is required"),
                       ([f"--workdir={workdir}", "--nearest=luz",
                         "--checkpoint=7"], "--checkpoint=7")):
    code = cli.run_command(inspect_cli.main, ["inspect", *args])
    assert_usage_error(code, capsys.readouterr().err, needle)


def _train(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT,
                        env=TRAIN_ENV, capture_output=True, text=True,
                        timeout=timeout)


def test_train_usage_errors(tmp_path):
  for args, needles in (
      (["--config=experiments/configs/nope.py", f"--workdir={tmp_path}"],
       ["nope.py"]),
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--config.model.d_model=abc"], ["d_model", "abc"]),
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--config.no_such_field=1"], ["no_such_field"]),
      # A nested field, misspelt: the flag as given, and ml_collections' hint.
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--config.optimizer.wsd_fraction=0.3"],
       ["--config.optimizer.wsd_fraction:", "'wsd_fraction'",
        '"wsd_decay_fraction"']),
      # A schedule that cannot run: refused before the workdir changes.
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--config.optimizer.schedule=wsd",
        "--config.optimizer.wsd_decay_fraction=0.9"],
       ["wsd_decay_fraction=0.9", "inside the warm-up of 100 steps"]),
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--config.optimizer.ema_decay=1.5"], ["ema_decay=1.5", "[0, 1)"]),
      (["--config=experiments/configs/tiny.py"], ["--workdir is required"]),
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--checkpoint=soon"], ["--checkpoint=soon"]),
      # A step the workdir lacks: refused before a tokenizer trains, with a
      # budget (planned first) or without.
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--checkpoint=7"], ["no checkpoint of step 7", "steps: none"]),
      (["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
        "--checkpoint=7", "--config.max_minutes=1"],
       ["no checkpoint of step 7"])):
    proc = _train(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
      assert needle in lines[0], (needle, proc.stderr)
  assert not any(tmp_path.iterdir())  # nothing written


def test_train_impossible_model_config(tmp_path):
  proc = _train("--config=experiments/configs/tiny.py",
                f"--workdir={tmp_path / 'run'}", "--config.synthetic_data=True",
                "--config.model.num_heads=5")
  assert proc.returncode == 2, proc.stderr
  assert "num_heads" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- damaged checkpoints

def _corrupt(step_dir: pathlib.Path, how: str):
  state = step_dir / "state"
  if how == "truncated_array":
    for f in (state / "ocdbt.process_0" / "d").iterdir():
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  elif how == "missing_metadata":
    (state / "_METADATA").unlink()
  elif how == "empty_manifest":
    for f in state.rglob("manifest.ocdbt"):
      f.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated_array", "missing_metadata",
                                 "empty_manifest"])
def test_inference_falls_back_past_a_damaged_latest_checkpoint(
    tmp_path, how, capsys):
  path, _, saved = make_workdir(tmp_path / "run", steps=(10, 20, 30))
  _corrupt(pathlib.Path(path) / "checkpoints" / "30", how)
  before = checksums(path)
  loaded = inference.load(path)
  [step] = loaded.steps
  # The params returned are exactly those of the step named.
  jax.tree.map(np.testing.assert_array_equal, loaded.params, saved[step])
  err = capsys.readouterr().err
  # A step without its pytree metadata is damaged here as in training, which
  # cannot restore its optimizer state: one rule for both.
  assert step == 20
  assert "skipping checkpoint step 30" in err and "does not restore" in err
  # An explicitly chosen damaged step is an error, not a silent fallback.
  with pytest.raises(Exception):
    inference.load(path, checkpoint=30)
  assert checksums(path) == before  # nothing deleted or rewritten


def test_evaluate_cli_falls_back(tmp_path, capsys):
  path, _, _ = make_workdir(tmp_path / "run", steps=(10, 20, 30))
  _corrupt(pathlib.Path(path) / "checkpoints" / "30", "truncated_array")
  code, out, err = run_evaluate([
      f"--workdir={path}", "--split=validation", "--decoding=greedy",
      "--max_extra_len=4", "--batch_size=8",
      f"--output_dir={tmp_path / 'out'}"], capsys)
  assert code == 0, err
  assert "skipping checkpoint step 30" in err
  assert "validation.step20.greedy.json" in out


def test_unknown_characters_are_named(workdir):
  code, out, err = run_translate([f"--workdir={workdir}", "--decoding=greedy",
                                  "--max_extra_len=4"],
                                 "Luz.\nDios \U0001F600 luz.\n".encode())
  assert code == 0, err
  assert len(out.splitlines()) == 2
  assert "line 2:" in err and "\U0001F600" in err and "<unk>" in err
  assert "line 1:" not in err


# ---------------------------------------------------------------- training

def _train_tiny(workdir, *args):
  return _train("--config=experiments/configs/tiny.py", f"--workdir={workdir}",
                "--config.synthetic_data=True", "--config.eval_every_steps=1000",
                "--config.checkpoint_every_steps=10",
                "--config.checkpoint.max_to_keep=5", *args, timeout=300)


def test_train_resumes_past_a_damaged_checkpoint_and_from_a_chosen_step(
    tmp_path):
  run = tmp_path / "run"
  proc = _train_tiny(run, "--config.num_train_steps=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _corrupt(run / "checkpoints" / "20", "truncated_array")
  damaged = checksums(run / "checkpoints" / "20")
  proc = _train_tiny(run, "--config.num_train_steps=30")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipping checkpoint step 20" in proc.stderr
  assert "Resuming from step 10" in proc.stdout
  # The damaged step is kept, moved out of the way of the new step 20.
  assert checksums(run / "checkpoints_set_aside" / "20") == damaged
  assert sorted(p.name for p in (run / "checkpoints").iterdir()
                if p.name.isdigit()) == ["10", "20", "30"]
  # --checkpoint=<step> resumes there; newer steps are set aside, not lost.
  proc = _train_tiny(run, "--config.num_train_steps=20", "--checkpoint=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming from step 10" in proc.stdout
  assert "is newer than --checkpoint" in proc.stdout
  assert (run / "checkpoints_set_aside" / "30").is_dir()
  proc = _train_tiny(run, "--checkpoint=999")
  assert proc.returncode == 2 and "999" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_disk_full_during_a_save_is_one_line(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs",
                          str(disk)], capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
  try:
    proc = _train_tiny(disk / "run", "--config.num_train_steps=60")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) <= 3, proc.stderr
    assert lines[-1].startswith("ERROR: CheckpointWriteError: ")
    assert "No space left on device" in lines[-1]
    assert "The newest complete checkpoint is step 10" in lines[-1]
    # That checkpoint is intact.
    _, _, params, steps = inference.load_params(disk / "run")
    assert steps == [10]
    assert all(np.isfinite(np.asarray(x)).all()
               for x in jax.tree.leaves(params))
  finally:
    subprocess.run(["umount", str(disk)], check=False)
