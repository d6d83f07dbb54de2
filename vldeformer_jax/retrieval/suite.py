"""One model over several prepared datasets with one protocol: scene- vs object-centric, instance and label metrics.

A suite file (JSON, or YAML when named .yaml/.yml):

  {"protocol": "full", "rerank_top_k": 0, "rerank_score": "cross", "rerank_weight": 0.5,
   "label_map_ks": [10, 50], "max_images": null,
   "datasets": [{"name": "vldeformer_demo", "data_dir": "runs/demo/data", "split": "test", "tag": "scene"},
                {"name": "vldeformer_demo_objects", "data_dir": "runs/demo/data", "tag": "object",
                 "label": "demo objects"}]}

`tag` is `scene` (several objects and relations per image) or `object` (one object per image); `split`
defaults to `test`, `label` (the row name) to `name/split`; a relative `data_dir` is read from the suite
file's folder. Every dataset goes through `evaluate.evaluate` (same protocol, batch size, re-rank depth,
score and weight: retrieval/rerank.py) and `label_metrics.label_map_metrics` on the decomposed similarity,
with each image's tag words as its labels.

The result (`run_suite`, one per model) is deterministic: the same export and data give the same JSON
(wall-clock timings are left out):
  {"model", "export", "export_fingerprint", "suite", "protocol", "rerank_top_k", "rerank_score",
   ["rerank_weight" (mixed)], ["rerank_export"],
   "datasets": {label: {"name", "data_dir", "split", "tag", ...evaluate's metrics..., "label_map": {...}}},
   "dataset_order": [label, ...] (the suite's order),
   "by_tag": {"scene": {metric: mean over the tag's datasets}, "object": {...}}}
and one fixed-width table (`format_suite_table`) with a row per dataset and a mean row per tag.

The re-rank depth guard: re-ranking only reorders each query's top `rerank_top_k`, so a reported R@K with K
larger than that depth would mix re-ranked and unre-ranked positions. A suite with 0 < rerank_top_k <
max(RECALL_KS) is refused (`RerankDepthError`) before anything is loaded.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from vldeformer_jax.io.files import read_json, read_yaml, write_json_atomic, write_text_atomic
from vldeformer_jax.retrieval import label_metrics
from vldeformer_jax.retrieval.metrics import PROTOCOLS, RECALL_KS
from vldeformer_jax.retrieval.rerank import RERANK_SCORES

TAGS = ("scene", "object")
_DATASET_KEYS = {"name", "data_dir", "split", "tag", "label"}
_SUITE_KEYS = {"datasets", "protocol", "rerank_top_k", "rerank_score", "rerank_weight", "label_map_ks",
               "max_images", "batch_size"}
_TIMING_KEYS = ("timing", "seconds")


class RerankDepthError(ValueError):
  """The re-rank depth is smaller than the largest K reported."""


def check_rerank_depth(rerank_top_k: int, ks=RECALL_KS) -> None:
  """Refuses 0 < rerank_top_k < max(ks) with one line."""
  k = int(rerank_top_k or 0)
  if 0 < k < max(ks):
    raise RerankDepthError(f"re-rank depth {k} is smaller than the largest K reported (R@{max(ks)}): a "
                           f"re-ranked R@{max(ks)} would mix re-ranked and unre-ranked positions; use "
                           f"rerank_top_k >= {max(ks)} or 0")


def load_suite(path_or_dict, overrides: dict | None = None) -> dict:
  """Reads and checks a suite (see the module docstring); returns it with defaults filled in. `overrides`:
  top-level values (not None) that replace the file's before the checks (the launcher's flags)."""
  base = "."
  if isinstance(path_or_dict, dict):
    suite = dict(path_or_dict)
  else:
    path = str(path_or_dict)
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith((".yaml", ".yml")):
      suite = read_yaml(path, what="suite file")
    else:
      suite = read_json(path, what="suite file")
    if not isinstance(suite, dict):
      raise ValueError(f"suite {path}: expected a mapping with `datasets`, got {type(suite).__name__}")
  suite.update({k: v for k, v in (overrides or {}).items() if v is not None})
  unknown = set(suite) - _SUITE_KEYS
  if unknown:
    raise ValueError(f"suite: unknown keys {sorted(unknown)}; expected some of {sorted(_SUITE_KEYS)}")
  datasets = suite.get("datasets")
  if not datasets or not isinstance(datasets, list):
    raise ValueError("suite: `datasets` must be a non-empty list")
  suite.setdefault("protocol", "full")
  if suite["protocol"] not in PROTOCOLS:
    raise ValueError(f"suite: unknown protocol {suite['protocol']!r}; expected one of {PROTOCOLS}")
  suite.setdefault("rerank_top_k", 0)
  suite.setdefault("rerank_score", "cross")
  if suite["rerank_score"] not in RERANK_SCORES:
    raise ValueError(f"suite: unknown rerank_score {suite['rerank_score']!r}; expected one of {RERANK_SCORES}")
  try:
    suite["rerank_weight"] = float(suite.get("rerank_weight", 0.5))
  except (TypeError, ValueError):
    raise ValueError(f"suite: rerank_weight must be a number, got {suite['rerank_weight']!r}") from None
  suite.setdefault("label_map_ks", list(label_metrics.LABEL_MAP_KS))
  suite.setdefault("max_images", None)
  out, seen = [], set()
  for i, d in enumerate(datasets):
    if not isinstance(d, dict) or not {"name", "data_dir", "tag"} <= set(d):
      raise ValueError(f"suite dataset {i}: needs `name`, `data_dir` and `tag`, got {d!r}")
    if set(d) - _DATASET_KEYS:
      raise ValueError(f"suite dataset {i}: unknown keys {sorted(set(d) - _DATASET_KEYS)}")
    if d["tag"] not in TAGS:
      raise ValueError(f"suite dataset {i} ({d['name']}): tag {d['tag']!r} is not one of {TAGS}")
    d = {"split": "test", **d}
    d["data_dir"] = os.path.normpath(os.path.join(base, d["data_dir"]))
    d.setdefault("label", f"{d['name']}/{d['split']}")
    if d["label"] in seen:
      raise ValueError(f"suite dataset {i}: label {d['label']!r} used twice")
    seen.add(d["label"])
    out.append(d)
  suite["datasets"] = out
  return suite


def _image_labels(gallery) -> np.ndarray:
  sets = [label_metrics.labels_from_tags(gallery.source[int(r)]["tags"]) for r in gallery.rows]
  return label_metrics.label_matrix(sets)[0]


def _strip_timing(x):
  if isinstance(x, dict):
    return {k: _strip_timing(v) for k, v in x.items() if k not in _TIMING_KEYS and not k.startswith("_")}
  if isinstance(x, list):
    return [_strip_timing(v) for v in x]
  return x


_SUMMARY = (("i2t R@1", ("i2t", "R@1")), ("t2i R@1", ("t2i", "R@1")), ("rsum", ("rsum",)),
            ("label_mAP@all i2t", ("label_map", "label_mAP@all", "i2t")),
            ("label_mAP@all t2i", ("label_map", "label_mAP@all", "t2i")),
            ("label_mAP@R i2t", ("label_map", "label_mAP@R", "i2t")),
            ("label_mAP@R t2i", ("label_map", "label_mAP@R", "t2i")))


def _get(m, path):
  for k in path:
    m = m[k]
  return m


def evaluate_suite(encoder, suite, *, batch_size: int | None = None, mesh=None, progress: bool = False,
                   load_split=None, cross_encoder=None) -> dict:
  """Every dataset of `suite` (a dict from `load_suite`, or a path) with `encoder`; see the module docstring.
  `cross_encoder`: whose match head scores re-ranked pairs for `cross` / `mixed` (default `encoder`)."""
  from vldeformer_jax.retrieval import evaluate as evaluate_lib
  if load_split is None:
    from vldeformer_jax.data.prepare import load_split
  suite = load_suite(suite)
  check_rerank_depth(suite["rerank_top_k"])
  batch_size = batch_size or suite.get("batch_size")
  out: dict[str, Any] = {"export_fingerprint": encoder.fingerprint, "protocol": suite["protocol"],
                         "rerank_top_k": int(suite["rerank_top_k"]), "rerank_score": suite["rerank_score"],
                         "datasets": {},
                         "dataset_order": [d["label"] for d in suite["datasets"]]}
  if suite["rerank_score"] == "mixed":
    out["rerank_weight"] = suite["rerank_weight"]
  for d in suite["datasets"]:
    source = load_split(d["data_dir"], d["name"], d["split"])
    res = evaluate_lib.evaluate(encoder, source, suite["protocol"], batch_size, mesh,
                                rerank_top_k=suite["rerank_top_k"], max_images=suite["max_images"],
                                progress=progress, return_embeddings=True, rerank_score=suite["rerank_score"],
                                rerank_weight=suite["rerank_weight"], cross_encoder=cross_encoder)
    img, txt, gallery = res.pop("_embeddings")
    sim = evaluate_lib.similarity(img, txt, mesh)
    res["label_map"] = label_metrics.label_map_metrics(sim, _image_labels(gallery), gallery.txt2img,
                                                       ks=suite["label_map_ks"])
    res["label_map"]["scores"] = "decomposed"
    out["datasets"][d["label"]] = {k: d[k] for k in ("name", "data_dir", "split", "tag")} | _strip_timing(res)
  out["by_tag"] = {}
  for tag in TAGS:
    rows = [m for m in out["datasets"].values() if m["tag"] == tag]
    if rows:
      out["by_tag"][tag] = {name: float(np.mean([_get(m, p) for m in rows])) for name, p in _SUMMARY}
      out["by_tag"][tag]["num_datasets"] = len(rows)
  return out


def format_suite_table(result: dict) -> str:
  """One line per dataset (instance R@K, rsum, label mAP@all / @R) and a mean line per tag."""
  cols = [name for name, _ in _SUMMARY]
  head = f"{'dataset':30s} {'tag':6s} {'img':>5s} " + " ".join(f"{c:>{max(8, len(c))}s}" for c in cols)
  lines = [head, "-" * len(head)]
  for label in result.get("dataset_order", list(result["datasets"])):  # the suite's order (JSON sorts keys)
    m = result["datasets"][label]
    vals = " ".join(f"{_get(m, p):>{max(8, len(c))}.2f}" for c, p in _SUMMARY)
    lines.append(f"{label[:30]:30s} {m['tag']:6s} {m['num_images']:5d} {vals}")
  for tag in [t for t in TAGS if t in result.get("by_tag", {})]:
    s = result["by_tag"][tag]
    vals = " ".join(f"{s[c]:>{max(8, len(c))}.2f}" for c in cols)
    lines.append(f"{'mean ' + tag + ' (' + str(s['num_datasets']) + ')':30s} {tag:6s} {'':5s} {vals}")
  return "\n".join(lines)


def run_suite(export: str, suite_path, *, output: str | None = None, rerank_top_k: int | None = None,
              rerank_score: str | None = None, rerank_weight: float | None = None, rerank_export: str | None = None,
              batch_size: int = 64, dtype: str | None = None, allow_untrained_head: bool = False,
              progress: bool = True) -> dict:
  """The launcher's job: one model (an export) over the suite; prints the table, and with `output` writes the
  JSON there and the table beside it (`<output without .json>.txt`), atomically. `rerank_top_k`,
  `rerank_score`, `rerank_weight` (not None) override the suite's; `rerank_export`: the cross-encoder of
  `cross` / `mixed` re-ranking (default: `export`). The depth guard runs before the export is loaded."""
  import jax

  from vldeformer_jax import parallel
  from vldeformer_jax.retrieval import evaluate as evaluate_lib
  from vldeformer_jax.retrieval.encoder import Encoder
  suite = load_suite(suite_path, {"rerank_top_k": rerank_top_k, "rerank_score": rerank_score,
                                  "rerank_weight": rerank_weight})
  check_rerank_depth(suite["rerank_top_k"])
  mesh = parallel.make_mesh() if jax.device_count() > 1 else None
  encoder = Encoder.load(export, dtype=dtype, mesh=mesh, batch_size=batch_size,
                         allow_untrained_head=allow_untrained_head)
  reranker = evaluate_lib.load_reranker(encoder, suite["rerank_top_k"], suite["rerank_score"], rerank_export,
                                        dtype=dtype, mesh=mesh, batch_size=batch_size,
                                        allow_untrained_head=allow_untrained_head)
  result = {"model": os.path.basename(os.path.normpath(export)), "export": export,
            "suite": None if isinstance(suite_path, dict) else str(suite_path)}
  if rerank_export is not None and reranker is not None:
    result["rerank_export"] = rerank_export
  result |= evaluate_suite(encoder, suite, batch_size=batch_size, mesh=mesh, progress=progress,
                           cross_encoder=reranker)
  table = format_suite_table(result)
  print(table)
  if output:
    write_json_atomic(output, result)
    write_text_atomic(os.path.splitext(output)[0] + ".txt", table + "\n")
  return result
