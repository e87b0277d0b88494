"""DevicePrefetch: the same batches in the same order, placed; exact resume
through get_state / set_state despite the read-ahead; errors reach the loop."""

import time

import jax
import numpy as np
import pytest

from benchmarks.loop import MemoryBatches
from train import sharding
from train.batches import SyntheticBatches
from train.prefetch import DevicePrefetch


def _batches(n):
  data = SyntheticBatches(batch_size=4, max_len=8, vocab_size=32, seed=1)
  return [next(data) for _ in range(n)]


def _runner():
  from experiments.configs import tiny
  from model import TransformerConfig
  from train import trainer
  return trainer.make_runner(tiny.get_config(),
                             TransformerConfig.preset("tiny"))


def test_same_batches_in_order_placed_by_the_runner():
  batches = _batches(5)
  runner = _runner()
  with DevicePrefetch(iter(list(batches)), runner.place_batch, size=2) as it:
    got = list(it)
  assert len(got) == 5
  for want, placed in zip(batches, got):
    for k, v in placed.items():
      assert isinstance(v, jax.Array)
      assert v.sharding.is_equivalent_to(runner.batch_sharding, 2)
      np.testing.assert_array_equal(np.asarray(v), want[k])
  # The training loop steps on prefetched batches as they are (no second
  # transfer), and places the others itself, once.
  from train import trainer
  prefetched = DevicePrefetch(iter(list(batches)), runner.place_batch, size=2)
  with prefetched:
    assert trainer.placed_batches(prefetched, runner.place_batch) is prefetched
  fed = next(trainer.placed_batches(iter(batches), runner.place_batch))
  for k, v in fed.items():
    assert v.sharding.is_equivalent_to(runner.batch_sharding, 2)
    np.testing.assert_array_equal(np.asarray(v), batches[0][k])


def test_state_is_the_last_batch_taken_not_the_read_ahead():
  batches = _batches(10)
  inner = MemoryBatches(batches)
  it = DevicePrefetch(inner, lambda b: b, size=3)
  assert it.get_state() == {"index": 0}
  first = [next(it) for _ in range(4)]
  state = it.get_state()
  assert state == {"index": 4}
  deadline = time.time() + 5
  while inner.index <= 4 and time.time() < deadline:
    time.sleep(0.01)
  assert inner.index > 4   # the thread has read ahead of what was taken
  assert it.get_state() == {"index": 4}
  rest = [next(it)["src"] for _ in range(3)]
  # Resuming from the saved state gives the batches an uninterrupted run saw.
  resumed = DevicePrefetch(MemoryBatches(batches), lambda b: b, size=3)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(rest),
                                np.stack([next(resumed)["src"]
                                          for _ in range(3)]))
  np.testing.assert_array_equal(first[0]["src"], batches[0]["src"])
  it.close()
  resumed.close()


def test_an_error_in_the_iterator_reaches_the_caller():
  def broken():
    yield {"src": np.zeros((1, 1))}
    raise OSError("disk gone")
  it = DevicePrefetch(broken(), lambda b: b)
  next(it)
  with pytest.raises(OSError, match="disk gone"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_size_must_be_positive():
  with pytest.raises(ValueError, match="size=0"):
    DevicePrefetch(iter([]), lambda b: b, size=0)


def test_make_global_batch_one_process_equals_the_rows():
  mesh = sharding.create_mesh({"data": -1})
  spec = sharding.batch_sharding(mesh, ())
  batch = _batches(1)[0]
  placed = sharding.make_global_batch(batch, spec)
  for k, v in batch.items():
    np.testing.assert_array_equal(np.asarray(placed[k]), v)
    assert placed[k].shape == v.shape
