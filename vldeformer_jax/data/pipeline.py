"""The training input pipeline: host-sharded, deterministic, resumable (docs/method.md §3.4, §5).

What the data is at step `s` is a pure function of (seed, s), never of how many processes or workers read
it, so a run can resume on another pod shape and still see the same examples:

- an epoch is one pass over the images, in the order of a permutation seeded by (seed, epoch); it holds
  `num_images // global_batch_size` global batches, the remainder is dropped (docs/method.md §3.4: only full batches);
- global step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`; the iterator is infinite;
- each image comes with one caption drawn uniformly among its first `num_captions_per_image`, and with
  `negatives_per_pair` composed hard negatives (`negatives.py`), from generators seeded by
  (seed, epoch, image index);
- process `p` of `P` builds only rows `[p*B, (p+1)*B)` of the global batch, `B = global_batch_size / P`.

The machinery is grain: a `MapDataset` over step numbers whose map builds one process-local batch
(wordpieces from a per-word cache, data/wordpieces.py; region features widened into the batch once), thread prefetch, and `mp_prefetch` worker processes when
`worker_count > 0` (they die with the training process: `die_with_parent`). The iterator's state is just
the next step, so it is JSON, tiny, and valid for any process count or worker count.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import grain
import numpy as np

from vldeformer_jax.data import negatives as negatives_lib
from vldeformer_jax.data import storage
from vldeformer_jax.data import wordpieces as wordpieces_lib
from vldeformer_jax.data import region_classes as region_classes_lib

STATE_FORMAT = "vldeformer_jax.train_iterator"
_MAX_STEPS = 2 ** 62  # "infinite": a lazy grain range over step numbers
# Separate random streams derived from the one seed: SeedSequence([seed, stream, epoch, image]).
_STREAM_PERMUTATION, _STREAM_CAPTION, _STREAM_NEGATIVES = 1, 2, 3
_TOKENIZER_LOCK = wordpieces_lib.TOKENIZER_LOCK  # HF fast tokenizers are not thread-safe (tokenizers#537)
_STORED_DTYPES = tuple(storage.FEATURE_DTYPES.values())  # region features kept as stored until the batch


def steps_per_epoch(num_images: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder of each epoch's permutation is dropped)."""
  steps = num_images // global_batch_size
  if steps < 1:
    raise ValueError(f"the source has {num_images} images, fewer than one global batch of {global_batch_size}")
  return steps


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of the process "
                     f"count {process_count}")
  return global_batch_size // process_count


def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
  """The image order of `epoch`: the same on every process."""
  return np.random.default_rng([seed, _STREAM_PERMUTATION, epoch]).permutation(num_images)


def _as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class BatchBuilder:
  """Step number -> process-local batch (numpy). Picklable, so grain can ship it to worker processes."""

  def __init__(self, source, *, tokenizer, global_batch_size: int, seed: int, max_text_len: int,
               max_regions: int, feature_dim: int, num_captions_per_image: int, negatives_per_pair: int,
               replace_ratio: float, process_index: int, process_count: int, tag_vocabulary=None,
               max_tag_len: int = 0, region_labels: bool = False, bitext=None, topics=None):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if num_captions_per_image < 1:
      raise ValueError(f"num_captions_per_image must be >= 1, got {num_captions_per_image}")
    if negatives_per_pair < 0:
      raise ValueError(f"negatives_per_pair must be >= 0, got {negatives_per_pair}")
    self.source = source
    self.tokenizer = tokenizer
    self.num_images = len(source)
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = local_batch_size(self.global_batch_size, process_count)
    self.steps_per_epoch = steps_per_epoch(self.num_images, self.global_batch_size)
    self.seed = int(seed)
    self.max_text_len = max_text_len
    self.max_tag_len = max_tag_len or max_text_len  # 0: as long as the captions (docs/method.md §3.2)
    self.max_regions = max_regions
    self.feature_dim = feature_dim
    self.num_captions_per_image = num_captions_per_image
    self.negatives_per_pair = negatives_per_pair
    self.replace_ratio = replace_ratio
    self.process_index = process_index
    self.process_count = process_count
    self.tag_vocabulary = None
    if negatives_per_pair:
      if tag_vocabulary is None:
        tag_vocabulary = negatives_lib.build_tag_vocabulary(source)
      self.tag_vocabulary = negatives_lib.as_vocabulary(tag_vocabulary)
    self._permutation_cache: tuple[int, np.ndarray] | None = None
    self._wordpieces = None  # made on first use, in whichever process builds batches
    # `image_region_labels` [B, R] (masked object classification, docs/method.md §4.8) when asked for.
    self.region_labels = region_classes_lib.ClassWords(tokenizer) if region_labels else None
    self.bitext = bitext  # data/bitext.py BitextBatches: `bitext_a_*` / `bitext_b_*` beside the batch, or None
    self.topics = topics  # data/topics.py TopicTargets: `image_topic_target` + `topic_word_*` (§4.10), or None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_permutation_cache"] = None
    state["_wordpieces"] = None
    return state

  def _permutation(self, epoch: int) -> np.ndarray:
    cache = self._permutation_cache  # one read: prefetch threads may replace it concurrently
    if cache is None or cache[0] != epoch:
      cache = (epoch, epoch_permutation(self.seed, epoch, self.num_images))
      self._permutation_cache = cache
    return cache[1]

  def _tokenize(self, captions, images, tags) -> tuple[dict, dict]:
    """`inputs.text_inputs` and `inputs.image_inputs`, byte for byte, faster: wordpieces come from a
    per-word cache (data/wordpieces.py) and each image's regions are widened to float32 straight into the
    batch. `images`: per image, a list of (features [n, F], rows or None) pieces, stacked in order."""
    if self._wordpieces is None:
      self._wordpieces = wordpieces_lib.WordpieceTokenizer(self.tokenizer)
    text = self._wordpieces.segments(captions, self.max_text_len, token_type=0)
    seg = self._wordpieces.segments(tags, self.max_tag_len, token_type=1)
    n, r = len(images), self.max_regions
    feats = np.zeros((n, r, self.feature_dim), np.float32)
    region_mask = np.zeros((n, r), np.int32)
    for i, pieces in enumerate(images):
      filled = 0
      for array, rows in pieces:
        part = array if rows is None else array[rows]
        take = min(len(part), r - filled)
        feats[i, filled:filled + take] = part[:take]
        filled += take
      region_mask[i, :filled] = 1
    image = {"input_ids": seg["input_ids"], "token_type_ids": seg["token_type_ids"],
             "attention_mask": np.concatenate([seg["attention_mask"], region_mask], axis=1), "img_feats": feats}
    return text, image

  def image_indices(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, this process's source indices for global step `step`)."""
    epoch, j = divmod(int(step), self.steps_per_epoch)
    start = j * self.global_batch_size + self.process_index * self.local_batch_size
    return epoch, self._permutation(epoch)[start:start + self.local_batch_size]

  def _record(self, index: int) -> dict[str, Any]:
    record = self.source[int(index)]
    for key in ("image_id", "features", "tags", "captions"):
      if key not in record:
        raise KeyError(f"record {index} of the source has no {key!r} field (fields: {sorted(record)})")
    features = np.asarray(record["features"])
    if features.dtype not in _STORED_DTYPES:  # what the old path did to any other dtype, once
      features = features.astype(np.float32)
    if features.ndim != 2 or features.shape[1] != self.feature_dim:
      raise ValueError(f"record {index} (image_id {record['image_id']}): 'features' has shape {features.shape}, "
                       f"expected [n, {self.feature_dim}]")
    out = {"image_id": int(record["image_id"]), "features": features[:self.max_regions],
           "tags": _as_str(record["tags"]), "captions": [_as_str(c) for c in record["captions"]]}
    if self.region_labels is not None:
      out["region_classes"] = region_classes_lib.record_region_classes(record, index)
    return out

  def _caption(self, record: dict, index: int, epoch: int) -> str:
    captions = record["captions"][:self.num_captions_per_image]
    if not captions:
      raise ValueError(f"record {index} (image_id {record['image_id']}) has no captions")
    rng = np.random.default_rng([self.seed, _STREAM_CAPTION, epoch, int(index)])
    return captions[int(rng.integers(len(captions)))]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, indices = self.image_indices(step)
    records = [self._record(i) for i in indices]
    captions = [self._caption(r, i, epoch) for r, i in zip(records, indices)]
    text, image = self._tokenize(captions, [[(r["features"], None)] for r in records], [r["tags"] for r in records])
    batch = {f"text_{k}": v for k, v in text.items()}
    batch.update({f"image_{k}": v for k, v in image.items()})
    batch["image_id"] = np.array([r["image_id"] for r in records], np.int64)
    if self.region_labels is not None:
      batch["image_region_labels"] = self.region_labels.label_ids([r["region_classes"] for r in records],
                                                                  self.max_regions)
    if self.negatives_per_pair:
      batch.update(self._negatives(records, captions, indices, epoch))
    if self.bitext is not None:
      with _TOKENIZER_LOCK:  # see _tokenize
        batch.update(self.bitext(step, self.tokenizer))
    if self.topics is not None:  # (the wordpiece cache takes the tokenizer lock itself)
      batch.update(self.topics.batch([r["captions"][:self.num_captions_per_image] for r in records],
                                     self._wordpieces, self.max_text_len))
    return batch

  def _negatives(self, records, captions, indices, epoch) -> dict[str, np.ndarray]:
    """K composed (negative caption, negative image) pairs per positive: [B, K, ...] arrays."""
    k = self.negatives_per_pair
    neg_captions, neg_features, neg_tags = [], [], []
    for record, caption, index in zip(records, captions, indices):
      rng = np.random.default_rng([self.seed, _STREAM_NEGATIVES, epoch, int(index)])
      for _ in range(k):
        other = self._record(negatives_lib.draw_other_index(rng, self.num_images, int(index)))
        neg_captions.append(negatives_lib.negative_caption(caption, self.tag_vocabulary, rng, self.replace_ratio))
        own, theirs = record["features"], other["features"]
        rows_a, rows_b, tags = negatives_lib.negative_image_rows(len(own), record["tags"], len(theirs),
                                                                 other["tags"], rng)
        neg_features.append([(own, rows_a), (theirs, rows_b)])  # = negative_image(...), copied once
        neg_tags.append(tags)
    text, image = self._tokenize(neg_captions, neg_features, neg_tags)
    b = len(records)
    out = {f"neg_text_{key}": v.reshape((b, k) + v.shape[1:]) for key, v in text.items()}
    out.update({f"neg_image_{key}": v.reshape((b, k) + v.shape[1:]) for key, v in image.items()})
    return out


def _allow_unparsed_absl_flags() -> None:
  """grain <= 0.2.18 reads an absl flag when it starts worker processes with JAX imported and raises
  `UnparsedFlagAccessError` in programs that never parse flags (tests, notebooks): google/grain#1355,
  fixed upstream by #1362. Marking the flags parsed keeps their defaults; `absl.app.run` still parses
  argv as usual."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def die_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 0) -> None:
  """grain `worker_init_fn`: the worker is killed when its parent dies, however it dies (SIGKILL, the OOM
  killer), instead of living on re-parented to init and holding the parent's output pipes open.

  Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`; the parent is the thread that started the worker, which is the
  training loop's (it calls `next`). Elsewhere a no-op."""
  del worker_index, worker_count
  import ctypes
  import os
  import signal
  import sys
  if not sys.platform.startswith("linux"):
    return
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
  except (OSError, AttributeError):
    return
  if os.getppid() != parent_pid:  # the parent died before the line above: nothing would kill us
    os._exit(1)


class TrainIterator(Iterator[dict]):
  """Infinite iterator of process-local training batches with `get_state` / `set_state`.

  The state is the next global step; the grain iterator behind it is (re)built from that step on demand,
  so whatever was prefetched but not yet yielded is simply rebuilt after a restore.
  """

  def __init__(self, builder: BatchBuilder, *, worker_count: int = 0, prefetch: int = 2):
    if worker_count < 0 or prefetch < 0:
      raise ValueError(f"worker_count ({worker_count}) and prefetch ({prefetch}) must be >= 0")
    self.builder = builder
    self.worker_count = worker_count
    self.prefetch = prefetch
    self._step = 0
    self._iterator = None

  @property
  def steps_per_epoch(self) -> int:
    return self.builder.steps_per_epoch

  @property
  def local_batch_size(self) -> int:
    return self.builder.local_batch_size

  @property
  def step(self) -> int:
    """The global step of the next batch."""
    return self._step

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's batch of global step `step`, built directly (no prefetch; for notebooks and tests)."""
    return self.builder(step)

  def _make_iterator(self):
    dataset = grain.MapDataset.range(self._step, _MAX_STEPS).map(self.builder)
    read = grain.ReadOptions(num_threads=min(self.prefetch, 4), prefetch_buffer_size=self.prefetch)
    dataset = dataset.to_iter_dataset(read)
    if self.worker_count:
      _allow_unparsed_absl_flags()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.worker_count, per_worker_buffer_size=max(1, self.prefetch)),
          worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    return iter(dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._make_iterator()
    batch = next(self._iterator)
    if self.worker_count:  # detach from grain's shared-memory blocks so they are freed now
      batch = {k: np.array(v, copy=True) for k, v in batch.items()}
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state; valid for any process count and worker count."""
    b = self.builder
    return {"format": STATE_FORMAT, "version": 1, "step": self._step, "seed": b.seed,
            "global_batch_size": b.global_batch_size, "num_images": b.num_images,
            "negatives_per_pair": b.negatives_per_pair}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a train iterator state (expected format {STATE_FORMAT!r}): {state!r}")
    b = self.builder
    for field, mine in (("seed", b.seed), ("global_batch_size", b.global_batch_size),
                        ("num_images", b.num_images), ("negatives_per_pair", b.negatives_per_pair)):
      if state.get(field) != mine:
        raise ValueError(f"train iterator state field {field!r} is {state.get(field)!r}, but this pipeline has "
                         f"{mine!r}: the saved data order does not apply")
    step = state.get("step")
    if not isinstance(step, int) or step < 0:
      raise ValueError(f"train iterator state field 'step' must be a non-negative int, got {step!r}")
    self.close()
    self._step = step

  def close(self) -> None:
    """Stops prefetch threads and worker processes; iteration may continue afterwards (rebuilt lazily)."""
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      self._iterator = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_train_iterator(source, *, tokenizer, global_batch_size: int, seed: int, max_text_len: int,
                        max_regions: int, feature_dim: int, num_captions_per_image: int = 5,
                        negatives_per_pair: int = 0, replace_ratio: float = 0.3, process_index: int | None = None,
                        process_count: int | None = None, worker_count: int = 0, prefetch: int = 2,
                        tag_vocabulary=None, max_tag_len: int = 0, region_labels: bool = False,
                        bitext=None, topics=None) -> TrainIterator:
  """The training iterator over `source` (random access: `len`, `[i]` -> record dict, see ARCHITECTURE.md).

  Yields this process's rows of each global batch: dicts of numpy arrays with the "Training batch" keys
  of ARCHITECTURE.md plus `image_id`, and `neg_text_*` / `neg_image_*` [B, K, ...] when
  `negatives_per_pair` K > 0. `process_index` / `process_count` default to JAX's. `tag_vocabulary` (a
  `negatives.TagVocabulary` or a list of words) spares a scan of the source when negatives are on; see
  `negatives.build_tag_vocabulary(source, cache_path=...)`. `max_tag_len`: tag tokens (0: `max_text_len`).
  `region_labels`: add `image_region_labels` [B, R] int32, the word id of each region's detector class
  (data/region_classes.py; 0 on padding), for masked object classification. `bitext`: a
  `data.bitext.BitextBatches` whose caption-translation rows of each step ride along (`bitext_a_*`, `bitext_b_*`).
  `topics`: a `data.topics.TopicTargets`: add `image_topic_target` [B, V] and `topic_word_*` [B, V, L].
  """
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  builder = BatchBuilder(
      source, tokenizer=tokenizer, global_batch_size=global_batch_size, seed=seed, max_text_len=max_text_len,
      max_regions=max_regions, feature_dim=feature_dim, num_captions_per_image=num_captions_per_image,
      negatives_per_pair=negatives_per_pair, replace_ratio=replace_ratio, process_index=process_index,
      process_count=process_count, tag_vocabulary=tag_vocabulary, max_tag_len=max_tag_len,
      region_labels=region_labels, bitext=bitext, topics=topics)
  return TrainIterator(builder, worker_count=worker_count, prefetch=prefetch)
