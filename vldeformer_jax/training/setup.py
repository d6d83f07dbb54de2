"""The setup around the training loop: data, the init order, the input iterator, the export.

Kept apart from `loop.py` so the loop reads top to bottom and each decision here is one small function:
- `open_data`: the prepared tfds splits (optionally generating the demo dataset first);
- `initial_model` / `initial_state`: the init order of docs/method.md §6.2: resume from the workdir's latest
  checkpoint, else `config.init_export` (read_export + merge_params, with the config's dropout / pooling /
  projection / dtype overrides), else random init; parameters are born sharded (`jax.eval_shape` ->
  `parallel.param_shardings` -> `jax.jit(init, out_shardings=...)`), and a summary of what was loaded
  and what was initialised fresh is logged;
- `write_final_export`: the trained parameters in the one export format.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vldeformer_jax.data import bitext
from vldeformer_jax.data import demo_world
from vldeformer_jax.data import mixture
from vldeformer_jax.data import negatives
from vldeformer_jax.data import pipeline
from vldeformer_jax.data import prepare
from vldeformer_jax.io import checkpoint as ckpt_lib
from vldeformer_jax.io import convert
from vldeformer_jax.io import export as export_lib
from vldeformer_jax.io import files as fileio
from vldeformer_jax.model import inputs
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.model.vldeformer import init_params
from vldeformer_jax.training import moc
from vldeformer_jax.training import topic
from vldeformer_jax.training import state as state_lib

log = logging.getLogger(__name__)

# Model-config fields an export's config takes from `config.model` (everything else, the sizes, comes from
# the export). The input lengths always come from `config.data`.
EXPORT_OVERRIDES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "pooling", "projection_dim",
                    "dtype", "remat")
MODEL_CONFIG_FILE = "model_config.json"
VOCAB_FILE = "vocab.txt"
TRAIN_CONFIG_FILE = "config.json"  # the training config of the latest start (what `checkpoint_export` reads)


# ------------------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class Data:
  train: Any                 # random access: len(src), src[i] -> record dict
  eval: Any | None
  feature_dim: int
  data_dir: str


def data_dir_of(config, workdir: str) -> str:
  return os.path.abspath(config.data.data_dir or os.path.join(workdir, "data"))


def generate_demo(config, data_dir: str) -> None:
  """Writes and prepares the demo dataset into `data_dir` unless it is already there."""
  kwargs = {}
  if config.data.generate_num_train:
    kwargs["num_train"] = int(config.data.generate_num_train)
  if config.data.generate_num_test:
    kwargs["num_test"] = int(config.data.generate_num_test)
  if jax.process_index() == 0:
    demo_world.prepare_demo(data_dir, seed=config.data.generate_seed, name=config.data.name, **kwargs)
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost
    multihost.sync_global_processes("vldeformer_demo_data")


def open_train_source(config, data_dir: str):
  """The training split of `config.data.name`, or of every dataset of `config.data.mixture` mixed by weight
  (their region features must have one size), or a generated demo-world corpus (`config.data.corpus_size`);
  evaluation stays on `config.data.name`."""
  if config.data.corpus_size:
    corpus = demo_world.CorpusSource(int(config.data.corpus_size), seed=int(config.data.corpus_seed),
                                     world_seed=int(config.data.generate_seed))
    log.info("data: a generated pre-training corpus of %d demo-world images (seed %d, world %d)", len(corpus),
             corpus.seed, corpus.world_seed)
    return corpus
  if not config.data.mixture:
    return prepare.load_split(data_dir, config.data.name, config.data.train_split)
  parts = mixture.parse_mixture(config.data.mixture)
  sources = [prepare.load_split(data_dir, name, config.data.train_split) for name, _ in parts]
  dims = {name: int(np.asarray(src[0]["features"]).shape[-1]) for (name, _), src in zip(parts, sources) if len(src)}
  if len(set(dims.values())) > 1:
    raise ValueError(f"config.data.mixture: the datasets' region features differ in size: {dims}")
  mixed = mixture.MixtureSource(sources, [w for _, w in parts], seed=config.seed, names=[n for n, _ in parts])
  log.info("data: mixture of %s", mixed.describe())
  return mixed


def open_data(config, workdir: str) -> Data:
  data_dir = data_dir_of(config, workdir)
  if config.data.generate:
    generate_demo(config, data_dir)
  train = open_train_source(config, data_dir)
  eval_source = None
  if config.train.eval_every >= 0 and config.data.eval_split:
    eval_source = prepare.load_split(data_dir, config.data.name, config.data.eval_split)
  if len(train) == 0:
    raise ValueError(f"dataset {config.data.name!r} in {data_dir}: split {config.data.train_split!r} is empty")
  feature_dim = int(np.asarray(train[0]["features"]).shape[-1])
  log.info("data: %s/%s: %d training images, %s eval images, %d-d regions", data_dir,
           config.data.mixture or config.data.name, len(train),
           len(eval_source) if eval_source is not None else "no", feature_dim)
  return Data(train=train, eval=eval_source, feature_dim=feature_dim, data_dir=data_dir)


def total_steps(config, num_train_images: int) -> int:
  if config.train.num_steps:
    return int(config.train.num_steps)
  per_epoch = num_train_images // config.train.global_batch_size
  if per_epoch < 1:
    raise ValueError(f"train.global_batch_size {config.train.global_batch_size} exceeds the "
                     f"{num_train_images} training images: not one full batch per epoch")
  return int(config.train.num_epochs * per_epoch)


def make_iterator(config, data: Data, vocab_file: str, workdir: str):
  tag_vocabulary = None
  names = [n for n, _ in mixture.parse_mixture(config.data.mixture)] if config.data.mixture else [config.data.name]
  if config.data.negatives.num_per_pair:
    cache = os.path.join(data.data_dir, f"{'+'.join(names)}_{config.data.train_split}_tag_vocabulary.json")
    tag_vocabulary = negatives.build_tag_vocabulary(data.train, cache_path=cache,
                                                    progress=jax.process_index() == 0)
  return pipeline.make_train_iterator(
      data.train, tokenizer=inputs.load_tokenizer(vocab_file), global_batch_size=config.train.global_batch_size,
      seed=config.seed, max_text_len=config.data.max_text_len, max_tag_len=config.data.max_tag_len,
      max_regions=config.data.max_regions,
      feature_dim=data.feature_dim, num_captions_per_image=config.data.num_captions_per_image,
      negatives_per_pair=config.data.negatives.num_per_pair, replace_ratio=config.data.negatives.replace_ratio,
      worker_count=config.data.worker_count, prefetch=config.data.prefetch, tag_vocabulary=tag_vocabulary,
      region_labels=moc.wants_region_labels(config), bitext=bitext_batches(config),
      topics=topic.topic_targets(config, data.train, data.data_dir, "+".join(names)))


def bitext_batches(config):
  """The caption-translation rows of each step (data/bitext.py) when `loss.text_text_weight` > 0, else None."""
  if config.objective != "decompose" or float(config.loss.get("text_text_weight", 0.0)) <= 0:
    return None
  pairs = bitext.read_bitext(config.data.bitext)
  log.info("data: %d bitext pairs from %s", len(pairs), config.data.bitext)
  return bitext.BitextBatches(pairs, global_batch_size=int(config.data.bitext_batch_size or
                                                           config.train.global_batch_size),
                              seed=config.seed, max_len=config.data.max_text_len,
                              process_index=jax.process_index(), process_count=jax.process_count())


# ------------------------------------------------------------------------------------------------------
# The init order.


@dataclasses.dataclass
class Init:
  model_config: ModelConfig
  vocab_file: str
  export_path: str | None   # weights to load when there is no checkpoint to resume
  description: str


def model_config_from(config) -> tuple[ModelConfig, str | None, str]:
  """(model config, export path or None, vocab file) the config asks for, before any resume."""
  lengths = {k: int(config.data[k]) for k in ("max_text_len", "max_tag_len", "max_regions")}
  if config.init_export:
    path = os.path.abspath(config.init_export)
    export_lib.read_metadata(path)
    mc = ModelConfig.from_json(os.path.join(path, export_lib.CONFIG_FILE), strict=True)
    overrides = {k: config.model[k] for k in EXPORT_OVERRIDES if config.model[k] != getattr(mc, k)}
    if overrides:
      log.info("init_export %s: model config overrides from config.model: %s", path, overrides)
    return mc.replace(**overrides, **lengths), path, os.path.join(path, export_lib.VOCAB_FILE)
  mc = ModelConfig.from_dict({**dict(config.model), **lengths}, strict=True, source="config.model")
  return mc, None, inputs.BUNDLED_VOCAB


def initial_model(config, workdir: str, *, write: bool = True) -> Init:
  """The model config and vocabulary of this run; a resumed run reuses the ones saved in `workdir`.
  `write=False`: decide without writing anything (to check the config against the data first)."""
  saved_config = os.path.join(workdir, MODEL_CONFIG_FILE)
  saved_vocab = os.path.join(workdir, VOCAB_FILE)
  if write and jax.process_index() == 0:
    fileio.write_text_atomic(os.path.join(workdir, TRAIN_CONFIG_FILE), config.to_json_best_effort(indent=2))
  wanted, export_path, vocab = model_config_from(config)
  if os.path.exists(saved_config) and os.path.exists(saved_vocab):
    # Rematerialisation is a memory choice of this start, not part of the model: the config's wins.
    saved = ModelConfig.from_json(saved_config, strict=True).replace(remat=wanted.remat)
    if saved != wanted:
      diff = {k: (v, getattr(wanted, k)) for k, v in saved.to_dict().items() if getattr(wanted, k) != v}
      log.warning("%s differs from the config (saved, config): %s; the saved one is used", saved_config, diff)
    return Init(saved, saved_vocab, export_path, f"model config from {saved_config}")
  write = write and jax.process_index() == 0
  if write:
    fileio.write_json_atomic(saved_config, wanted.to_dict())
    fileio.copy_file_atomic(vocab, saved_vocab)
  desc = f"export {export_path}" if export_path else f"random init (seed {config.seed})"
  return Init(wanted, saved_vocab if write else vocab, export_path, desc)


def initial_state(config, init: Init, tx, mesh, ckpts: ckpt_lib.Checkpoints):
  """(state, data iterator state or None, start step), following the init order."""
  mc = init.model_config
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  log_t0 = float(math.log(config.loss.temperature))
  logit_bias = state_lib.initial_logit_bias(config)  # the sigmoid loss's, else None
  fresh = state_lib.fresh_state_fn(mc, log_t0, tx, logit_bias)
  abstract = jax.eval_shape(fresh, init_rng)
  shardings = state_lib.state_shardings(abstract, mesh, tx)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))

  # The newest checkpoint that restores; damaged newer ones are moved aside (io/checkpoint.py).
  restored = (ckpts.restore_latest(ckpt_lib.abstract_like(abstract, shardings))
              if ckpts.latest_step() is not None else None)
  if restored is not None:
    latest, state, data_state, _ = restored
    log.info("init: resumed step %d from %s (%d parameters, optimiser state and data position restored)",
             latest, ckpts.directory, n_params)
    return state, data_state, latest

  if init.export_path:
    ex = export_lib.read_export(init.export_path)
    initialised = jax.device_get(jax.jit(init_params, static_argnums=0)(mc, init_rng))
    params = convert.merge_params(ex.params, initialised, allow_missing=tuple(config.init_allow_missing),
                                  what=f"init_export {init.export_path}")
    loaded = set(convert.flatten(ex.params))
    fresh_keys = sorted(k for k in convert.flatten(initialised) if k not in loaded)
    log.info("init: %d parameter tensors loaded from export %s (fingerprint %s); %d initialised fresh%s",
             len(loaded), init.export_path, ex.fingerprint[:16], len(fresh_keys),
             f": {', '.join(fresh_keys)}" if fresh_keys else "")
    params = state_lib.put_sharded(params, shardings.params)
    state = jax.jit(lambda p: state_lib.create_state(p, jnp.float32(log_t0), tx, logit_bias),
                    out_shardings=shardings)(params)
    return state, None, 0

  state = jax.jit(fresh, out_shardings=shardings)(init_rng)
  log.info("init: random init of all %d parameters (seed %d); nothing loaded", n_params, config.seed)
  return state, None, 0


# ------------------------------------------------------------------------------------------------------
# Evaluation and the export.


def untrained_at_init(init: Init) -> list[str]:
  """Parameter paths no training had reached before this run: the init export's `untrained` list, or every
  parameter of a random init."""
  if init.export_path:
    return export_lib.untrained_params(export_lib.read_metadata(init.export_path))
  shapes = jax.eval_shape(lambda rng: init_params(init.model_config, rng), jax.random.key(0))
  return sorted(convert.flatten(shapes))


def write_final_export(workdir: str, params, model_config: ModelConfig, init: Init, step: int, config) -> str:
  path = os.path.join(workdir, "export")
  export_lib.write_export(
      path, params, model_config, init.vocab_file,
      metadata={"source": f"vldeformer_jax.training.loop in {workdir}", "step": step, "objective": config.objective,
                "init": init.description, "dataset": config.data.name,
                export_lib.UNTRAINED_KEY: export_lib.untrained_after_training(
                    untrained_at_init(init), config.objective, float(config.loss.mlm_weight))},
      overwrite=True)
  return path
