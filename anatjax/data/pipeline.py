"""The Grain host pipeline: source -> this process's slice -> seeded shuffle -> repeat ->
the method's host transforms -> batch -> an iterator, with worker processes.

The iterator is checkpointable: its state (a small JSON dict) is saved with every
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import grain


def make_dataset(source, host_transforms, *, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 num_workers: int = 0, prefetch: int = 2,
                 start_batch: int = 0) -> grain.IterDataset:
  """This process's dataset of batches of `batch_size` (its share of the global batch).

  One global stream is defined for every process count: the source shuffled (reshuffled
  on every pass, since `repeat` reseeds), or in the order of its `ordered_stream(seed, global batch size)`,
  and transformed with per-example generators
  derived from `seed` and the example's position in that stream. Process p of P takes
  positions p, p + P, p + 2P, ... (disjoint examples; only those are ever loaded or
  transformed), so global batch k holds the same examples with the same random lesions
  whatever the number of processes: a run can move to another process count, and
  `start_batch` starts this process's share of the stream at global batch `start_batch`.
  """
  if hasattr(source, "ordered_stream"):
    # The source fixes the order itself (DrasCLR's location blocks): no shuffling.
    ds = source.ordered_stream(seed, batch_size * process_count).seed(seed)
  else:
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  for transform in host_transforms:
    if isinstance(transform, grain.transforms.RandomMap):
      ds = ds.random_map(transform)
    else:
      ds = ds.map(transform)
  ds = ds[process_index::process_count].batch(batch_size, drop_remainder=True)
  ds = ds[start_batch:]
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  return iter_ds


def transform_one(item, host_transforms, rng):
  """One source item through the host transforms in this process (no Grain): for tools
  that need a single example (shapes, per-worker speed)."""
  for transform in host_transforms:
    if isinstance(transform, grain.transforms.RandomMap):
      item = transform.random_map(item, rng)
    else:
      item = transform.map(item)
  return item
