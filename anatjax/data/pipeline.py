"""The Grain host pipeline: source -> this process's slice -> seeded shuffle -> repeat ->
the method's host transforms -> batch -> an iterator, with worker processes.

The iterator is checkpointable: its state (a small JSON dict) is saved with every
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import grain


def make_dataset(source, host_transforms, *, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 num_workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
  """The per-process dataset of batches of `batch_size` (this process's share).

  Each process reads a disjoint slice of the source. The order is reshuffled on every
  pass (`repeat` reseeds), and random transforms get a generator derived from `seed` and
  the example's position in the endless stream, so every pass draws fresh randomness.
  """
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]
  ds = ds.seed(seed).shuffle().repeat()
  for transform in host_transforms:
    if isinstance(transform, grain.transforms.RandomMap):
      ds = ds.random_map(transform)
    else:
      ds = ds.map(transform)
  ds = ds.batch(batch_size, drop_remainder=True)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  return iter_ds
