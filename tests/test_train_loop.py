"""The asynchronous train loop's parts (medcg.train.trainer): pending losses read back in one transfer, the
step clock, and the iterator position a checkpoint saves while the next batch is already staged. No training:
tests/test_train.py runs the loop itself (NaN guard read late, exact resume, SIGTERM)."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medcg.train import checkpoint as ckpt_lib
from medcg.train import trainer


def test_pending_steps_read_back_in_order_bitwise_with_extra():
  rng = np.random.default_rng()
  values = rng.standard_normal(5).astype(np.float32)
  pending = trainer._PendingSteps()
  for i, v in enumerate(values):
    pending.add(i + 1, jnp.asarray(v) * 1, np.array([f"id-{i}"], dtype=object))
  done, extra = pending.read({"lr": jnp.float32(0.5)})
  assert [s for s, _, _ in done] == [1, 2, 3, 4, 5]
  assert [loss for _, loss, _ in done] == [float(v) for v in values]  # what float(device scalar) gave
  assert [list(ids) for _, _, ids in done] == [[f"id-{i}"] for i in range(5)]
  assert float(extra["lr"]) == 0.5
  assert pending.read() == ([], None)  # popped


def test_step_clock_averages_over_the_window():
  clock = trainer._StepClock()
  for tokens in (10, 20, 30):
    clock.tick(tokens)
  dt, tokens = clock.lap()
  assert dt > 0 and tokens == 20
  assert clock.steps == 0 and clock.tokens == 0  # a new window


def _iterator():
  return iter(grain.MapDataset.range(10).to_iter_dataset())


def test_checkpoint_of_a_captured_position_resumes_before_the_staged_batch(tmp_path):
  """What the loop does at a checkpoint step: capture the position after batch N, read batch N+1 ahead, then
  save; the checkpoint's iterator resumes at batch N+1, through orbax and grain's own handler."""
  it = _iterator()
  assert [next(it), next(it)] == [0, 1]
  position = trainer._IteratorPosition(it)
  assert next(it) == 2  # staged ahead
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  state = {"step": jnp.int32(2)}
  ckpt.save(2, state, position, force=True)
  ckpt.close()
  assert next(it) == 3  # the live iterator is unaffected

  restored_iter = _iterator()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  restored = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), restored_iter)
  ckpt.close()
  assert int(restored["step"]) == 2
  assert next(restored_iter) == 2


def test_iterator_position_is_a_frozen_copy():
  it = _iterator()
  next(it)
  position = trainer._IteratorPosition(it)
  state = position.get_state()
  next(it)
  assert position.get_state() == state != it.get_state()
  with pytest.raises(TypeError):
    next(position)
