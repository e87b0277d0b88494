"""Tests of train/translate.py: order, empty and long lines, bad UTF-8, PNG."""

import io
import os
import subprocess
import sys

import pytest

from test_evaluate import shared_workdir  # tests/ is on sys.path
from train import inference, translate, translation

FAST = ["--decoding=greedy", "--max_extra_len=4", "--batch_size=4"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return shared_workdir(tmp_path_factory)[0]


# Short lines (<= 16 tokens): one length bucket, so one compilation.
SHORT = ["Luz.", "Y dijo Dios.", "la tierra y la luz", "Noche.", "Y fué.",
         "Dios vió la luz."]
LONG = "Y llamó Dios á la luz Día, y á las tinieblas llamó Noche."


def _translated_here(workdir, lines):
  """The translations of FAST's settings, computed in this process (one
  device) through the library rather than the command."""
  loaded = inference.load(workdir)
  expected, _, _ = translation.translate_texts(
      loaded.model_config, loaded.params, loaded.tokenizer, lines,
      translation.DecodeOptions(method="greedy", max_extra_len=4,
                                batch_size=4),
      max_src_tokens=loaded.experiment_config.data.max_len)
  return expected


def _run(args, stdin: bytes):
  out, err = io.StringIO(), io.StringIO()
  code = translate.run(["translate", *args], io.BytesIO(stdin), out, err)
  return code, out.getvalue(), err.getvalue()


def test_same_order_and_empty_lines(workdir):
  lines = [SHORT[0], "", SHORT[1], "   ", SHORT[2], SHORT[3]]
  code, out, err = _run([f"--workdir={workdir}", *FAST],
                        ("\n".join(lines) + "\n").encode())
  assert code == 0, err
  got = out.split("\n")
  assert got[-1] == "" and len(got) == len(lines) + 1
  assert got[:-1] == _translated_here(workdir, lines)
  assert got[1] == "" and got[3] == ""
  assert all(got[i] for i in (0, 2, 4, 5))


def test_two_cpu_devices_translate_like_one(workdir):
  """--decode_devices=2 (a child process: JAX's device count is fixed when
  its backend starts) gives this process' one-device translations."""
  lines = SHORT + [LONG]      # 7 lines, batches of 4: both devices get one
  proc = subprocess.run(
      [sys.executable, "-m", "train.translate", f"--workdir={workdir}",
       "--decode_devices=2", *FAST], input=("\n".join(lines) + "\n").encode(),
      capture_output=True, check=False)
  assert proc.returncode == 0, proc.stderr.decode()
  assert proc.stdout.decode().splitlines() == _translated_here(workdir, lines)


def test_long_line_truncated_with_warning(workdir):
  lines = [SHORT[0], LONG, SHORT[3]]
  code, out, err = _run([f"--workdir={workdir}", "--max_input_tokens=12",
                         *FAST], ("\n".join(lines) + "\n").encode())
  assert code == 0
  assert len(out.splitlines()) == 3
  assert "line 2:" in err and "truncated to 12" in err
  assert "line 1:" not in err and "line 3:" not in err


def test_invalid_utf8_stops_with_line_number(workdir, tmp_path):
  bad = "Hola.\n".encode() + b"Y la tierra \xff\xfe.\n" + b"Luz.\n"
  # The real program: the exit status must say it failed.
  proc = subprocess.run(
      [sys.executable, "-m", "train.translate", f"--workdir={workdir}",
       *FAST], input=bad, capture_output=True)
  assert proc.returncode == 1
  assert b"line 2" in proc.stderr and b"UTF-8" in proc.stderr
  assert proc.stdout == b""
  (tmp_path / "bad.txt").write_bytes(bad)
  code, out, err = _run([f"--workdir={workdir}",
                         f"--input={tmp_path / 'bad.txt'}", *FAST], b"")
  assert code == 1 and "line 2" in err and out == ""


def test_sampling_with_top_k_one_is_greedy(workdir):
  text = ("\n".join(SHORT[:4]) + "\n").encode()
  _, greedy, _ = _run([f"--workdir={workdir}", *FAST], text)
  code, sampled, err = _run([f"--workdir={workdir}", "--decoding=sample",
                             "--top_k=1", "--seed=3", "--max_extra_len=4",
                             "--batch_size=4"], text)
  assert code == 0, err
  assert sampled == greedy
  code, _, err = _run([f"--workdir={workdir}", "--decoding=sample",
                       "--top_p=1.5"], text)
  assert code == 2 and "top_p" in err


def test_attention_png(workdir, tmp_path):
  png = tmp_path / "attention.png"
  code, out, err = _run([f"--workdir={workdir}", f"--attention_png={png}",
                         *FAST], (SHORT[5] + "\n").encode())
  assert code == 0, err
  assert len(out.splitlines()) == 1
  data = png.read_bytes()
  assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
  code, _, err = _run([f"--workdir={workdir}", f"--attention_png={png}",
                       *FAST], b"one\ntwo\n")
  assert code == 2 and "exactly one" in err


def test_commands_keep_compiled_programs_for_the_next_one(workdir, tmp_path):
  env = dict(os.environ, FLAX_MT_COMPILATION_CACHE="1",
             XDG_CACHE_HOME=str(tmp_path),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cache = tmp_path / "flax-transformer-mt" / "xla"
  outputs = []
  for _ in range(2):
    proc = subprocess.run(
        [sys.executable, "-m", "train.translate", f"--workdir={workdir}",
         *FAST], input="Luz.\nY dijo Dios.\n", capture_output=True,
        text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    outputs.append(proc.stdout)
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit__one_hypothesis_segment")
               for name in entries), entries
  assert outputs[0] == outputs[1]
