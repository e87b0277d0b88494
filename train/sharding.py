"""Placement: a Mesh (data, fsdp, tensor), logical-axis rules, jit and pmap.

One train step (``train/steps.py``) runs in one of two modes, chosen by
``config.parallelism``:

* ``"jit"`` (default): ``jax.jit`` with ``NamedSharding`` in/out shardings on a
  ``Mesh`` with axes ``data``, ``fsdp``, ``tensor`` (what ``pjit`` became).
  Params and optimizer state are laid out by ``config.logical_axis_rules``
  (the model's logical names -> mesh axes, a table in the experiment config);
  the batch is split over ``data`` x ``fsdp``; the state buffers are donated.
* ``"pmap"``: plain data parallelism, ``jax.pmap`` over all local devices, the
  state replicated, gradients summed with ``lax.psum`` of per-device losses
  normalised by the global token count (= ``lax.pmean`` of the per-device
  gradients of the global mean loss).

Both give the numbers of one device holding the whole batch (tested in
tests/test_sharding.py). Multi-host: ``maybe_initialize_distributed`` calls
``jax.distributed.initialize`` when ``config.distributed.enabled``; each host
feeds its own rows and ``jax.make_array_from_process_local_data`` assembles
the global batch. Only process 0 logs (``is_main_process``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.batches import BATCH_KEYS

MESH_AXES = ("data", "fsdp", "tensor")
PMAP_AXIS = "batch"

_distributed_initialized = False


# ---------------------------------------------------------------- hosts

def maybe_initialize_distributed(dist) -> None:
  """``jax.distributed.initialize`` when ``dist.enabled`` (``config.distributed``).

  Fields: coordinator_address ("" = auto-detect, e.g. on a TPU VM slice),
  num_processes, process_id (-1 = auto), cpu_collectives ("gloo" for CPU
  multi-process). Call before anything touches a device.
  """
  global _distributed_initialized
  if not dist.enabled or _distributed_initialized:
    return
  if dist.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation",
                      dist.cpu_collectives)
  kwargs = {}
  if dist.coordinator_address:
    kwargs["coordinator_address"] = dist.coordinator_address
  if dist.num_processes > 0:
    kwargs["num_processes"] = dist.num_processes
  if dist.process_id >= 0:
    kwargs["process_id"] = dist.process_id
  jax.distributed.initialize(**kwargs)
  _distributed_initialized = True


def is_main_process() -> bool:
  return jax.process_index() == 0


# ---------------------------------------------------------------- mesh

def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; one of them may be -1 = the rest."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got "
                     f"{dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices "
          f"are not divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
        f"devices but {num_devices} are available; set one axis to -1")
  return tuple(sizes)


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None
                ) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_rules(table) -> tuple[tuple[str, Any], ...]:
  """config.logical_axis_rules (lists from JSON or the command line) as the
  tuple of pairs flax expects."""
  rules = []
  for name, target in table:
    if isinstance(target, list):
      target = tuple(target)
    rules.append((name, target))
  return tuple(rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """[batch, length] arrays: batch over what activation_batch maps to."""
  spec = nn.logical_to_mesh_axes(("activation_batch", None), rules)
  return NamedSharding(mesh, spec)


def state_shardings(abstract_boxed, mesh: Mesh, rules):
  """NamedShardings of a (boxed) state tree, by its logical axis names."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def make_global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding
                      ) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax Arrays sharded by ``sharding``.

  ``sharding.spec`` partitions the batch (first) dimension, e.g.
  ``P("data", None)`` or ``P(("data", "fsdp"))``; arrays with fewer dimensions
  than the spec (eval ``row_mask``, ``index``: ``[rows]``) use its leading
  entries. The global batch has ``rows * jax.process_count()`` rows.
  """
  def target(x) -> NamedSharding:
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:x.ndim]))

  batch = {k: np.asarray(v) for k, v in batch.items()}
  if jax.process_count() == 1:
    # The local rows are the global batch: one batched device_put (measured
    # ~2x faster on a CPU than one make_array_from_process_local_data per key).
    return jax.device_put(batch, {k: target(v) for k, v in batch.items()})
  return {k: jax.make_array_from_process_local_data(target(v), v)
          for k, v in batch.items()}


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying shardings: an Orbax restore target."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


# ---------------------------------------------------------------- runners

class Runner:
  """Puts the model's state, batches and steps on devices.

  init_state(rng) -> state; train_step(state, batch, rng) -> (state, metrics);
  eval_step(params, batch) -> sums; place_batch(numpy batch) -> device
  batch; state_for_checkpoint(state) / abstract_state() for Orbax;
  host_params(params) -> params one host-side computation (decoding) can use.
  Metrics come back as device scalars; ``jax.device_get`` them when needed.
  """

  def __init__(self, parts: dict[str, Any], global_batch_size: int,
               devices: Sequence[jax.Device] | None = None):
    self.parts = parts  # steps.build(...)
    self.global_batch_size = global_batch_size
    self.devices = list(devices) if devices is not None else jax.devices()

  # shapes of a fresh state, logical boxes kept
  def _abstract_boxed(self):
    return jax.eval_shape(
        lambda rng: self.parts["create_state"](rng, boxed=True),
        jax.random.key(0))


class JitRunner(Runner):
  """jax.jit with NamedShardings over a (data, fsdp, tensor) mesh."""

  def __init__(self, parts, global_batch_size, mesh_config, rules,
               devices=None):
    super().__init__(parts, global_batch_size, devices)
    self.mesh = create_mesh(mesh_config, self.devices)
    self.rules = logical_rules(rules)
    boxed = self._abstract_boxed()
    self.shardings = state_shardings(boxed, self.mesh, self.rules)
    self._abstract = nn.unbox(boxed)
    self.batch_sharding = batch_sharding(self.mesh, self.rules)
    n_batch = math.prod(self.mesh.shape[a] for a in
                        _axes(self.batch_sharding.spec[0]))
    if global_batch_size % n_batch:
      raise ValueError(
          f"global batch size {global_batch_size} is not divisible by the "
          f"{n_batch} batch shards of mesh {dict(self.mesh.shape)}")
    replicated = NamedSharding(self.mesh, P())
    self._init = jax.jit(self.parts["create_state"],
                         out_shardings=self.shardings)
    batch_sh = {k: self.batch_sharding for k in BATCH_KEYS}
    self._train = jax.jit(self.parts["train_step"],
                          in_shardings=(self.shardings, batch_sh, replicated),
                          out_shardings=(self.shardings, replicated),
                          donate_argnums=(0,))
    self._eval = jax.jit(self.parts["eval_step"],
                         in_shardings=(self.shardings.params, batch_sh),
                         out_shardings=replicated)

  @contextlib.contextmanager
  def _context(self):
    """Mesh + rules, so the model's activation constraints take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init_state(self, rng):
    # out_shardings places the fresh state by the rules.
    return self._init(rng)

  def place_state(self, state):
    """A state held on host (or anywhere) -> this mesh's shardings."""
    return jax.device_put(state, self.shardings)

  def place_batch(self, batch: dict[str, np.ndarray]):
    """Host-local rows -> global arrays sharded over the batch axes."""
    return make_global_batch({k: batch[k] for k in BATCH_KEYS},
                             self.batch_sharding)

  def train_step(self, state, batch, rng):
    with self._context():
      return self._train(state, batch, rng)

  def eval_step(self, params, batch):
    with self._context():
      return self._eval(params, batch)

  def abstract_state(self):
    """Restore target: shapes, dtypes and this mesh's shardings."""
    return with_shardings(self._abstract, self.shardings)

  def state_for_checkpoint(self, state):
    return state

  def state_from_checkpoint(self, state):
    return state

  def host_params(self, params):
    return params


class PmapRunner(Runner):
  """jax.pmap over local devices, state replicated, batch split."""

  def __init__(self, parts, global_batch_size, devices=None):
    super().__init__(parts, global_batch_size, devices)
    if jax.process_count() > 1:
      # A pmap given only this host's devices would reduce gradients within
      # the host alone and the hosts' models would drift apart.
      raise ValueError(
          "config.parallelism='pmap' runs on one host only; with "
          f"{jax.process_count()} processes use parallelism='jit' (the mesh "
          "spans every host's devices)")
    self.devices = [d for d in self.devices
                    if d.process_index == jax.process_index()]
    self.n = len(self.devices)
    local_batch = global_batch_size // jax.process_count()
    if local_batch % self.n:
      raise ValueError(f"per-host batch {local_batch} is not divisible by "
                       f"{self.n} local devices (parallelism='pmap')")
    parts = self.parts
    train = lambda s, b, r: parts["train_step"](s, b, r, axis_name=PMAP_AXIS)
    evaluate = lambda p, b: parts["eval_step"](p, b, axis_name=PMAP_AXIS)
    self._train = jax.pmap(train, axis_name=PMAP_AXIS, devices=self.devices,
                           in_axes=(0, 0, None), donate_argnums=(0,))
    self._eval = jax.pmap(evaluate, axis_name=PMAP_AXIS, devices=self.devices)
    self._abstract = nn.unbox(self._abstract_boxed())
    self.single = jax.sharding.SingleDeviceSharding(self.devices[0])
    self._stacked = NamedSharding(Mesh(np.array(self.devices), (PMAP_AXIS,)),
                                  P(PMAP_AXIS))

  def _replicate(self, tree):
    """Leaves [...] -> [n_devices, ...], one copy on each device."""
    def put(x):
      x = jnp.asarray(x)
      shards = [jax.device_put(x[None], d) for d in self.devices]
      return jax.make_array_from_single_device_arrays(
          (self.n,) + x.shape, self._stacked, shards)
    return jax.tree.map(put, tree)

  def init_state(self, rng):
    state = jax.jit(self.parts["create_state"])(rng)
    return self._replicate(state)

  def place_state(self, state):
    return self._replicate(jax.device_get(state))

  def place_batch(self, batch):
    """Rows split over the local devices: [n_devices, rows / n, ...] arrays
    on the devices."""
    return {k: jax.device_put(
        np.asarray(batch[k]).reshape(self.n, -1, *batch[k].shape[1:]),
        self._stacked) for k in BATCH_KEYS}

  def train_step(self, state, batch, rng):
    state, metrics = self._train(state, batch, rng)
    return state, jax.tree.map(lambda x: x[0], metrics)

  def eval_step(self, params, batch):
    return jax.tree.map(lambda x: x[0], self._eval(params, batch))

  def abstract_state(self):
    return with_shardings(self._abstract,
                          jax.tree.map(lambda _: self.single, self._abstract))

  def state_for_checkpoint(self, state):
    return jax.tree.map(lambda x: x[0], state)

  def state_from_checkpoint(self, state):
    return self._replicate(state)

  def host_params(self, params):
    """The first device's replica (all replicas are equal)."""
    return jax.tree.map(lambda x: x[0], params)


def make_runner(parts: dict[str, Any], global_batch_size: int, *,
                parallelism: str = "jit", mesh_config=None, rules=(),
                devices=None) -> Runner:
  """The runner of ``config.parallelism`` for ``steps.build(...)``'s parts.

  mesh_config (``config.mesh``) and rules (``config.logical_axis_rules``)
  lay out the jit mode; pmap replicates.
  """
  if parallelism == "jit":
    mesh_config = mesh_config or {"data": -1}
    return JitRunner(parts, global_batch_size, mesh_config, rules, devices)
  if parallelism == "pmap":
    return PmapRunner(parts, global_batch_size, devices)
  raise ValueError(f"config.parallelism={parallelism!r}; choose 'jit' or "
                   "'pmap'")


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


