"""One workdir, one writer, nothing lost: faults and mistakes on a real workdir.

A tiny run (the `tiny` model on test_trainer's generated corpus, 20 steps,
checkpoints at 10 and 20) is trained once per module; each test damages or
misuses a copy of it, through ``python -m train`` child processes where a
process matters (a lock, a signal, stderr), and checks the exit status, the
first lines of stderr, and (where nothing should change) every file's sha256.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import tokenizer as tokenizer_lib
from test_errors import _corrupt, run_translate
from test_trainer import (ENV, ROOT, _checksums, _flags,
                          corpus_overrides)  # noqa: F401  (a fixture)
from train import checkpointing, inference, metrics

pytestmark = pytest.mark.slow  # child processes that compile


@pytest.fixture(scope="module")
def overrides(corpus_overrides):
  return {**corpus_overrides, "checkpoint.max_to_keep": 5,
          "num_train_steps": 20}


def _start(workdir, overrides, **more):
  return subprocess.Popen(_flags(workdir, **{**overrides, **more}), cwd=ROOT,
                          env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          start_new_session=True)  # its own process group


def _train(workdir, overrides, timeout=300, **more):
  proc = _start(workdir, overrides, **more)
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:   # a run that should have been refused
      proc.kill()
      proc.communicate()
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, overrides):
  """A finished 20-step run (checkpoints 10 and 20); copy it to change it."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  rc, _, err = _train(workdir, overrides)
  assert rc == 0, err[-3000:]
  assert checkpointing.complete_steps(
      checkpointing.checkpoint_dir(workdir)) == [10, 20]
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  return pathlib.Path(shutil.copytree(trained, tmp_path / "run"))


def _usage_error(rc, err, *needles):
  assert rc == 2, err[-3000:]
  first = err.strip().splitlines()
  assert 1 <= len(first) <= 2 and first[0].startswith("error: "), err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in first[0], (needle, err)


def _wait_for_step(workdir, proc, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    path = workdir / metrics.METRICS_FILE
    if path.exists() and any(f'"step": {s},' in path.read_text()
                             for s in range(step, step + 50)):
      return
    time.sleep(0.2)
  raise AssertionError(f"no step {step} logged in {timeout} s")


def _translate(workdir):
  return run_translate([f"--workdir={workdir}", "--decoding=greedy",
                        "--max_extra_len=4"], b"El perro come pan.\n")


def _train_steps(workdir):
  return [r["step"] for r in metrics.read_metrics(workdir) if "train_loss" in r]


# ---------------------------------------------------------------- one writer

def test_a_second_writer_is_refused_readers_run_and_ctrl_c_saves(
    run, overrides):
  first = _start(run, overrides, num_train_steps=10**6)
  try:
    _wait_for_step(run, first, 23)
    kept = {k: v for k, v in _checksums(run).items()
            if k.startswith(("tokenizer/", "config.json"))}
    rc, out, err = _train(run, overrides, timeout=120, num_train_steps=10**6)
    _usage_error(rc, err, f"--workdir={run} is in use by another training run "
                 f"(host {os.uname().nodename}, pid {first.pid}, since 20")
    assert out == ""
    assert {k: v for k, v in _checksums(run).items() if k in kept} == kept
    # Reading a workdir needs no lock: translate runs beside the training.
    code, text, terr = _translate(run)
    assert code == 0, terr
    assert len(text.splitlines()) == 1
    # Ctrl-C (SIGINT to the process group, as a terminal sends it) saves.
    os.killpg(first.pid, signal.SIGINT)
    out, err = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, err[-3000:]
  assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
  assert err.strip().splitlines()[-1].startswith("Ctrl-C: saving a checkpoint")
  stopped = int(re.search(r"Stopping at step (\d+) on signal SIGINT; "
                          r"checkpoint saved", out)[1])
  assert stopped in checkpointing.complete_steps(
      checkpointing.checkpoint_dir(run))
  steps = _train_steps(run)   # each step once: the refused run logged none
  assert max(steps) == stopped and len(steps) == len(set(steps)) == stopped
  assert not (run / "train.lock").exists()   # released at the end


def test_a_killed_run_does_not_block_its_resume_nor_double_its_log(
    run, overrides):
  killed = _start(run, overrides, num_train_steps=10**6,
                  checkpoint_every_steps=10**6)
  try:
    _wait_for_step(run, killed, 27)
  finally:
    killed.kill()   # SIGKILL: the lock's file stays, naming a dead process
    killed.wait()
  assert json.loads((run / "train.lock").read_text())["pid"] == killed.pid
  logged = _train_steps(run)
  assert max(logged) >= 27 and checkpointing.complete_steps(
      checkpointing.checkpoint_dir(run)) == [10, 20]
  # A full disk cut the log's last record short.
  with open(run / metrics.METRICS_FILE, "a") as f:
    f.write('{"step": 99, "train_lo')
  rc, out, err = _train(run, overrides, num_train_steps=30)
  assert rc == 0, err[-3000:]
  assert "Resuming from step 20" in out
  # Each step once: the killed run's steps after 20 are set aside, the
  # replayed ones logged anew; the cut line stays a line of its own.
  steps = _train_steps(run)
  assert steps == list(range(1, 31)), steps
  superseded = [json.loads(line)["step"] for line in
                (run / metrics.SUPERSEDED_FILE).read_text().splitlines()
                if "train_loss" in line]
  assert superseded == [s for s in logged if s > 20]
  lines = (run / metrics.METRICS_FILE).read_text().splitlines()
  assert lines.count('{"step": 99, "train_lo') == 1


def test_one_process_claims_its_workdir_once_another_is_refused(tmp_path):
  # A budget's plan and the training it plans claim the workdir in one
  # process: the second claim is the lock already held, not a refusal.
  from train import workdir as workdir_lib
  first = workdir_lib.claim(tmp_path, tokenizer=False)
  assert workdir_lib.claim(tmp_path, tokenizer=False) is first
  code = ("import sys; from train import workdir as w\n"
          "try:\n  w.claim(sys.argv[1], tokenizer=False)\n"
          "except w.WorkdirError as e:\n  print(e); sys.exit(3)\n")
  other = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=ENV)
  assert other.returncode == 3, other.stderr
  assert f"pid {os.getpid()}" in other.stdout
  first.release()
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()
  # A refusal after the claim (in the plan or the trainer's setup) lets go.
  with pytest.raises(workdir_lib.WorkdirError):
    with workdir_lib.claim(tmp_path, tokenizer=False).released_on_error():
      workdir_lib.check_steps_left(20, 10, tmp_path)
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()
  again = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=ENV)
  assert again.returncode == 0, again.stdout + again.stderr


def test_read_metrics_names_a_damaged_line(tmp_path, capsys):
  (tmp_path / metrics.METRICS_FILE).write_text(
      '{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo\n'
      '{"step": 3, "train_loss": 1.0}\n')
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 3]
  err = capsys.readouterr().err
  assert "metrics.jsonl line 2 is damaged" in err and len(err.splitlines()) == 1
  # A writer completes the cut line before appending a whole record.
  (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1, "train_lo')
  writer = metrics.MetricWriter(tmp_path)
  writer.write(2, {"train_loss": 1.5})
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [2]


def test_a_second_ctrl_c_stops_at_once(capfd, monkeypatch):
  from train import interrupts, stop as stop_lib

  def exit_now(code):
    raise SystemExit(code)
  monkeypatch.setattr(interrupts.os, "_exit", exit_now)
  with stop_lib.StopRequest(0, time.time()) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert stop.signalled == "signal SIGINT" and stop.requested(True)
    with pytest.raises(SystemExit) as exited:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert exited.value.code == 130
  err = capfd.readouterr().err.splitlines()
  assert err[0].startswith("Ctrl-C: saving a checkpoint after this step")
  assert err[1] == ("Stopped at once on a second Ctrl-C: nothing saved since "
                    "the last checkpoint")
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------- the tokenizer

def test_checkpoints_without_their_tokenizer_are_refused(run, overrides):
  path = tokenizer_lib.model_path(run)
  real = path.read_bytes()
  path.unlink()
  before = _checksums(run)
  rc, _, err = _train(run, overrides, num_train_steps=30)
  _usage_error(rc, err, f"--workdir={run} holds checkpoints (steps [10, 20]) "
               "but not the tokenizer they were trained with")
  assert _checksums(run) == before and not path.exists()

  # Another tokenizer (another model type on the same text) in its place.
  texts = [line for pair in open(overrides["data.train_tsv_file"])
           for line in pair.strip().split("\t")]
  other = tokenizer_lib.train(texts, vocab_size=96, model_type="bpe")
  tokenizer_lib.save(other, path)
  before = _checksums(run)
  rc, _, err = _train(run, overrides, num_train_steps=30)
  record = json.loads((run / "checkpoints/20/config/metadata").read_text())
  saved = record["tokenizer"]["fingerprint"]
  assert saved == tokenizer_lib.Tokenizer(real).fingerprint
  _usage_error(rc, err, f"{path} (fingerprint {other.fingerprint}) is not the "
               f"tokenizer the checkpoint of step 20", f"(fingerprint {saved})")
  assert _checksums(run) == before
  code, _, terr = _translate(run)
  _usage_error(code, terr, f"(fingerprint {saved})")


def test_a_garbled_tokenizer_is_named_by_every_command(run, overrides,
                                                       capsys):
  from train import cli, evaluate
  path = tokenizer_lib.model_path(run)
  path.write_bytes(path.read_bytes()[:200])
  before = _checksums(run)
  needle = f"{path} is damaged: it does not load as a SentencePiece model"
  rc, _, err = _train(run, overrides, num_train_steps=30)
  _usage_error(rc, err, needle, "Put back the run's copy")
  code, _, terr = _translate(run)
  _usage_error(code, terr, needle)
  code = cli.run_command(evaluate.main, ["evaluate", f"--workdir={run}"])
  _usage_error(code, capsys.readouterr().err, needle)
  assert _checksums(run) == before


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
  """A workdir whose newest step (20) is damaged, of a model with enough
  arrays (12 layers) that TensorStore's failed reads can flood stderr with
  asyncio tracebacks (up to 4,673 lines from translate before they were
  filtered, or none: it depends on the threads' timing)."""
  from test_evaluate import make_workdir
  path = tmp_path_factory.mktemp("damaged") / "run"
  path.mkdir()
  make_workdir(path, steps=(10, 20), num_encoder_layers=6,
               num_decoder_layers=6)
  _corrupt(path / "checkpoints" / "20", "truncated_array")
  return path


@pytest.mark.parametrize("command", ["evaluate", "translate"])
def test_falling_back_past_a_damaged_checkpoint_is_one_quiet_line(
    damaged, tmp_path, command):
  before = _checksums(damaged)
  src = tmp_path / "src.txt"
  src.write_text("Luz.\nY la tierra.\n")
  args = [f"--workdir={damaged}", "--decoding=greedy", "--max_extra_len=2",
          f"--input={src}"]
  if command == "evaluate":
    args.append(f"--output_dir={tmp_path / 'out'}")
  proc = subprocess.run([sys.executable, "-m", f"train.{command}", *args],
                        cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, (len(lines), proc.stderr[-3000:])
  assert re.fullmatch(
      r"warning: skipping checkpoint step 20, which does not restore: "
      rf"{re.escape(str(damaged))}/checkpoints/20/state/?: array "
      r"\S+ does not read: [A-Z_]+: .+ \(\w+\)", lines[0]), lines[0]
  assert _checksums(damaged) == before


def test_the_debris_of_abandoned_checkpoint_reads_is_dropped():
  # What an abandoned Orbax restore leaves, each kind made deterministically
  # (the real restore leaves any mix of them, or none), beside look-alikes of
  # the project's own that must still print.
  code = r"""if True:
    import gc, logging
    from train import checkpointing
    checkpointing.quiet_abandoned_checkpoint_io()
    logging.basicConfig()

    # 1. TensorStore's callbacks on the closed loop, raising at collection.
    class Callback:
      def __init__(self, error): self.error = error
      def __del__(self): raise self.error
    Callback(RuntimeError("Event loop is closed"))
    Callback(ValueError("a real error"))

    # 2. An Orbax read coroutine collected unfinished: its closing
    # (GeneratorExit) becomes an Exception with the array's spec. The same
    # coroutine defined in a file of the project's own still reports.
    source = (
        "class Pending:\n"
        "  def __await__(self):\n"
        "    yield\n"
        "async def read_array():\n"
        "  try:\n"
        "    await Pending()\n"
        "  except BaseException as e:\n"
        "    raise Exception('Encountered error while reading array') from e\n")
    for where in ("/site-packages/orbax/checkpoint/serialization.py",
                  "/project/train/reader.py"):
      scope = {}
      exec(compile(source, where, "exec"), scope)
      coroutine = scope["read_array"]()
      coroutine.send(None)  # runs to its first await, as a read does
      del coroutine
      gc.collect()

    # 3. asyncio's log of the sibling reads' errors nobody retrieved.
    asyncio_log = logging.getLogger("asyncio")
    for error in (ValueError('OUT_OF_RANGE: Error reading "x/0.0" in OCDBT'),
                  ValueError("an error of the project's own")):
      asyncio_log.error("Task exception was never retrieved",
                        exc_info=(type(error), error, None))

    # 4. A coroutine of Orbax's never awaited, and one of the project's.
    async def _read_array_index_and_device_put(): pass
    async def a_coroutine_of_the_project(): pass
    _read_array_index_and_device_put()
    a_coroutine_of_the_project()
    gc.collect()
  """
  # The coroutines Orbax leaves unawaited are the ones the filter names.
  names = checkpointing._orbax_coroutine_names()  # pylint: disable=protected-access
  assert {"_read_array_index_and_device_put", "async_deserialize"} <= set(names)
  assert not {"read", "write", "exists"} & set(names)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  err = proc.stderr
  for dropped in ("Event loop is closed", "OUT_OF_RANGE", "orbax/checkpoint",
                  "_read_array_index_and_device_put"):
    assert dropped not in err, err
  for kept in ("ValueError: a real error", 'File "/project/train/reader.py"',
               "ValueError: an error of the project's own",
               "coroutine 'a_coroutine_of_the_project' was never awaited"):
    assert kept in err, err
  assert err.count("Encountered error while reading array") == 1, err


def test_a_step_without_its_metadata_is_damaged_for_train_and_evaluate(
    run, overrides, capsys):
  (run / "checkpoints/20/state/_METADATA").unlink()
  _, _, _, used = inference.load_params(run)
  assert used == [10]
  assert ("warning: skipping checkpoint step 20, which does not restore: "
          f"{run}/checkpoints/20/state/_METADATA: missing"
          ) in capsys.readouterr().err
  rc, out, err = _train(run, overrides, num_train_steps=30)
  assert rc == 0, err[-3000:]
  assert "Resuming from step 10" in out
  assert f"{run}/checkpoints/20/state/_METADATA: missing" in err


def test_readers_survive_a_training_pruning_the_steps_they_read(
    run, monkeypatch, capsys):
  # A training running in the workdir removes its oldest steps as it saves
  # (max_to_keep); a reader can see a step listed and then gone. Made
  # deterministically here: the step is removed at the moment it is read.
  directory = checkpointing.checkpoint_dir(run)
  spare = shutil.copytree(directory / "10", run.parent / "spare10")
  real_manager, calls = inference.ocp.CheckpointManager, []

  def pruned_while_listed(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 1:   # Orbax listed step 10, then stats it: gone
      shutil.rmtree(directory / "10")
      raise FileNotFoundError(2, "No such file or directory",
                              str(directory / "10"))
    return real_manager(path, *args, **kwargs)
  monkeypatch.setattr(inference.ocp, "CheckpointManager", pruned_while_listed)
  _, _, _, used = inference.load_params(run)
  assert used == [20] and len(calls) == 2

  # A step removed while its params are read, for an average.
  shutil.copytree(spare, directory / "10")
  real_params = inference._Reader.params

  def pruned_while_read(self, step, *args, **kwargs):
    if step == 10:
      shutil.rmtree(directory / "10")
    return real_params(self, step, *args, **kwargs)
  monkeypatch.setattr(inference._Reader, "params", pruned_while_read)
  capsys.readouterr()
  _, _, _, used = inference.load_params(run, average_last=2)
  assert used == [20]
  assert (f"warning: skipping checkpoint step 10: {directory}/10 was removed "
          "while it was read (a training running in this workdir keeps only "
          "its newest checkpoints)\n") in capsys.readouterr().err

  # A missing file elsewhere is not a pruned step: raised at once.
  def missing_elsewhere(path, *args, **kwargs):
    calls.append(path)
    raise FileNotFoundError(2, "No such file or directory", "/elsewhere/x")
  monkeypatch.setattr(inference.ocp, "CheckpointManager", missing_elsewhere)
  calls.clear()
  with pytest.raises(FileNotFoundError):
    inference.load_params(run)
  assert len(calls) == 1


# ---------------------------------------------------------------- mistakes

def test_a_run_already_past_num_train_steps_changes_nothing(run, overrides):
  before = _checksums(run)
  rc, _, err = _train(run, overrides, num_train_steps=10)
  _usage_error(rc, err, "--config.num_train_steps=10: the run in "
               f"{run}/checkpoints is already at step 20; nothing was changed")
  assert _checksums(run) == before


def test_heads_not_dividing_d_model_are_refused_before_the_tokenizer(
    tmp_path, overrides):
  rc, _, err = _train(tmp_path / "new", overrides, **{"model.num_heads": 5})
  _usage_error(rc, err, "num_heads", "d_model=32 is not divisible")
  assert not (tmp_path / "new").exists()


def test_a_read_only_workdir_is_one_line_before_any_work(run, overrides,
                                                         tmp_path):
  mount = tmp_path / "read_only"
  mount.mkdir()
  done = subprocess.run(["mount", "--bind", "-o", "ro", str(run), str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot bind-mount read-only here: {done.stderr.strip()}")
  try:
    if os.access(mount, os.W_OK):
      pytest.skip("the bind mount is writable here")
    rc, out, err = _train(mount, overrides, num_train_steps=30)
    _usage_error(rc, err, f"--workdir={mount}: {mount} is read-only")
    assert out == ""
    code, text, terr = _translate(mount)   # reading it still works
    assert code == 0 and len(text.splitlines()) == 1, terr
  finally:
    subprocess.run(["umount", str(mount)], check=False)
