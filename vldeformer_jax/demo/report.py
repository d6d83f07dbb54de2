"""The demo's report: the accuracy and speed comparison as report.json, report.md and PNG plots.

Kept apart from the orchestration (job.py) so the numbers can be re-rendered from the saved results
without training anything: `write_report(workdir, build_report(...), runs)`. Every number names the set it
was measured on (the folds or the full test split) and its interval (how it was computed), and
extrapolated timings are marked as such.
"""
from __future__ import annotations

import json
import os

import numpy as np

from vldeformer_jax.demo import evaluation
from vldeformer_jax.demo.evaluation import avg_recall
from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import metrics
from vldeformer_jax.retrieval import modes

RECALL_KEYS = [(d, f"R@{k}") for d in ("i2t", "t2i") for k in metrics.RECALL_KS]
THESIS_PAIRS = (  # (model, baseline, question): differences the ablation reports with paired intervals
    ("stage2", "ablation_stage1_no_negatives", "what the bi-modal hard negatives add"),
    ("ablation_stage1_no_negatives", "ablation_random", "early-interaction pre-training vs random init"),
    ("ablation_stage1_no_negatives", "ablation_bert", "early-interaction pre-training vs plain BERT init"),
)


def _strip(result: dict) -> dict:
  return {k: v for k, v in result.items() if not k.startswith("_") and k not in ("ranks", "fold0_t2i_top5")}


def _mean_metrics(results: list[dict]) -> dict:
  """The R@K of several folds averaged (each fold weighs the same, as COCO 1K averages its folds)."""
  out = {d: {k: float(np.mean([r[d][k] for r in results])) for k in ("R@1", "R@5", "R@10")}
         for d in ("i2t", "t2i")}
  out["rsum"] = float(sum(out[d][k] for d, k in RECALL_KEYS))
  return out


def build_report(results: dict, timing: dict, stage_seconds: dict, runs: dict, labels: dict, *, main: str,
                 data: dict, bootstrap_samples: int = 1000) -> dict:
  """The report.json dict: the fold comparison with its interval, the ablation on the full split with
  bootstrap intervals, retrieve-then-re-rank, timing, and how each number was measured."""
  txt2img = np.asarray(results["txt2img"])
  cross_folds = results["cross_encoder_folds"]
  dec = results["decomposed"]
  n_pairs = int(sum(f["timing"]["pairs"] for f in cross_folds))
  drop = evaluation.drop_over_folds(cross_folds, dec[main]["folds"])
  ablations = {}
  for name, r in dec.items():
    full = evaluation.interval_of(r, txt2img, bootstrap_samples)
    ablations[name] = {
        "label": labels.get(name, name), "avg_recall_full": full["value"], "avg_recall_full_ci95": full["ci95"],
        "rsum_full": r["full"]["rsum"], "avg_recall_folds": float(np.mean([avg_recall(f) for f in r["folds"]])),
        "train_steps": int(runs[name][0].train.num_steps) if name in runs else 0,
        "train_batch": int(runs[name][0].train.global_batch_size) if name in runs else 0,
        "train_seconds": stage_seconds.get(name),
        "fine_grained": r.get("fine_grained"),
    }
  differences = []
  for a, b, question in THESIS_PAIRS:
    if a in dec and b in dec:
      d = evaluation.paired_difference(dec[a], dec[b], txt2img, bootstrap_samples)
      differences.append({"model": a, "baseline": b, "question": question, "avg_recall_difference": d["value"],
                          "ci95": d["ci95"], "method": d["method"]})
  report = {
      "data": data,
      "cross_encoder": _mean_metrics(cross_folds),
      "decomposed": _mean_metrics(dec[main]["folds"]),
      "avg_recall_cross_encoder": float(np.mean([avg_recall(f) for f in cross_folds])),
      "avg_recall_decomposed": float(np.mean([avg_recall(f) for f in dec[main]["folds"]])),
      "avg_recall_drop": drop,
      "cross_encoder_pairs": n_pairs,
      "cross_encoder_seconds": float(sum(f["timing"]["score_pairs_s"] for f in cross_folds)),
      "decomposed_full_split": _strip(dec[main]["full"]),
      "speedup": timing["speedup"],
      "speedup_gallery": timing["speedup_gallery"],
      "speedup_extrapolated": True,
      "evaluation_sets": {
          "folds": f"{results['folds']} disjoint folds of {results['fold_images']} consecutive images of the "
                   f"'{results['split']}' split, each with its captions; the cross-encoder scores every pair",
          "full_split": f"all {results['split_images']} images and {results['split_captions']} captions of the "
                        f"'{results['split']}' split",
      },
      "ablations": ablations,
      "ablation_differences": differences,
      "timing": timing,
      "stage_seconds": stage_seconds,
  }
  if "reranked" in results:
    rr = _strip(results["reranked"])
    report["reranked"] = rr
    report["avg_recall_reranked_full"] = avg_recall(rr)
  if "modes" in results:
    report["retrieval_modes"] = {k: v for k, v in results["modes"].items() if k != "_seconds"}
  fg = [f["fine_grained"] for f in cross_folds if f.get("fine_grained") and f["fine_grained"]["captions_with_siblings"]]
  if fg:
    w = np.array([f["captions_with_siblings"] for f in fg], np.float64)
    report["cross_encoder_fine_grained"] = {
        k: float(np.average([f[k] for f in fg], weights=w)) for k in ("above_every_sibling", "above_every_other_class_set")}
    report["cross_encoder_fine_grained"]["captions_with_siblings"] = int(w.sum())
  report["recall_vs_steps"] = {labels.get(n, n): curve for n, curve in results.get("curves", {}).items()}
  report["picture"] = _picture_data(results, main)
  return report


def _picture_data(results: dict, main: str) -> dict:
  """The first fold's first captions and the top-5 images each model ranks for them (fold positions)."""
  fold = results["cross_encoder_folds"][0]
  models = {"cross-encoder (stage 1)": fold["t2i_top5"]}
  for name, label in ((main, "decomposed (VLDeformer)"), ("ablation_random", "decomposed from random weights")):
    if name in results["decomposed"]:
      models[label] = results["decomposed"][name]["fold0_t2i_top5"]
  return {"image_ids": fold["image_ids"], "captions": fold["captions"], "txt2img": fold["txt2img"],
          "top5": models}


def _fmt_row(name: str, m: dict) -> str:
  cells = " | ".join(f"{m[d][k]:.2f}" for d, k in RECALL_KEYS)
  return f"| {name} | {cells} | {avg_recall(m):.2f} |"


def _ci(lo_hi) -> str:
  return f"[{lo_hi[0]:+.2f}, {lo_hi[1]:+.2f}]"


def comparison_table(report: dict) -> str:
  """The headline table: cross-encoder vs decomposed on the same folds, the drop and the speedup."""
  head = "| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | avg recall |\n|---|---|---|---|---|---|---|---|"
  d = report["avg_recall_drop"]
  lines = [f"Cross-encoder vs decomposed, mean over {d['n']} disjoint folds of test images "
           f"({report['cross_encoder_pairs']:,} pairs scored by the cross-encoder):", head,
           _fmt_row("stage 1: early-interaction cross-encoder", report["cross_encoder"]),
           _fmt_row("stage 2: decomposed (VLDeformer)", report["decomposed"])]
  if "reranked" in report:
    lines += ["", f"On the full test split ({report['evaluation_sets']['full_split']}):", head,
              _fmt_row("stage 2: decomposed (VLDeformer)", report["decomposed_full_split"]),
              _fmt_row(f"decomposed top-{report['reranked']['rerank_top_k']}, re-ranked by the cross-encoder",
                       report["reranked"])]
  lines += [f"\naverage recall drop (cross-encoder minus decomposed): {d['mean']:.2f} points, 95% interval "
            f"{_ci(d['ci95'])} ({d['method']})",
            f"retrieval speedup for a {report['speedup_gallery']} gallery: {report['speedup']:,.0f}x "
            "(cross-encoder side extrapolated from a timed sample)"]
  return "\n".join(lines)


def _plot_curves(workdir: str, runs: dict, labels: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from vldeformer_jax.training.metric_writers import read_metrics

  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for name, (_, run_dir) in runs.items():
    recs = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("split", "train") == "train"]
    if not recs:
      continue
    ax = axes[0] if name == "stage1" else axes[1]
    keys = ("itm_loss", "rank_loss", "itc_loss", "mlm_loss") if name == "stage1" else ("loss",)
    for key in keys:
      pts = [(r["step"], r[key]) for r in recs if key in r]
      if pts:
        ax.plot(*zip(*pts), label=key.replace("_", " ") if name == "stage1" else labels.get(name, name))
  axes[0].set_title("stage 1 on the pre-training corpus: its loss terms")
  axes[1].set_title("decomposition on the downstream train split: InfoNCE")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
  fig.tight_layout()
  fileio.save_figure_atomic(fig, path, dpi=90)


def _plot_recall(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = report.get("recall_vs_steps") or {}
  fig = plt.figure(figsize=(12, 8))
  grid = fig.add_gridspec(2, 2, height_ratios=[1, 1])
  axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, :]), fig.add_subplot(grid[0, 1])]
  drop = report["avg_recall_drop"]
  names = ["cross-encoder\n(stage 1)", "decomposed\n(VLDeformer)"]
  vals = [report["avg_recall_cross_encoder"], report["avg_recall_decomposed"]]
  axes[0].bar([0, 1], vals, 0.6, color=["#555555", "#1f77b4"])
  for x, v in zip([0, 1], vals):
    axes[0].text(x, v + 0.5, f"{v:.1f}", ha="center", fontsize=9)
  lo, hi = drop["ci95"]
  axes[0].errorbar([1], [vals[0] - drop["mean"]], yerr=[[drop["mean"] - lo], [hi - drop["mean"]]], fmt="none",
                   ecolor="k", capsize=6)
  axes[0].set_xticks([0, 1], names)
  axes[0].set_ylim(0, 105)
  axes[0].set_ylabel("average recall (mean of six R@K)")
  axes[0].set_title(f"same {drop['n']} folds; drop {drop['mean']:.2f} [{lo:.2f}, {hi:.2f}] (95%)", fontsize=10)
  abl = report["ablations"]
  order = sorted(abl, key=lambda n: abl[n]["avg_recall_full"])
  y = np.arange(len(order))
  v = [abl[n]["avg_recall_full"] for n in order]
  err = np.array([[abl[n]["avg_recall_full"] - abl[n]["avg_recall_full_ci95"][0],
                   abl[n]["avg_recall_full_ci95"][1] - abl[n]["avg_recall_full"]] for n in order]).T
  axes[1].barh(y, v, 0.6, xerr=err, capsize=4, color="#1f77b4")
  for yy, vv in zip(y, v):
    axes[1].text(1, yy, f"{vv:.1f}", va="center", color="white", fontsize=9)
  axes[1].set_yticks(y, [abl[n]["label"] for n in order], fontsize=8)
  axes[1].set_xlim(0, 100)
  axes[1].set_xlabel("average recall on the full test split (95% bootstrap interval)")
  axes[1].set_title("decomposed models: what the initialisation and hard negatives buy", fontsize=10)
  for label, curve in curves.items():
    if curve:
      axes[2].plot(*zip(*curve), marker="o", label=label.replace(", no hard negatives", ""))
  if not curves:
    axes[2].axis("off")
  else:
    axes[2].set_xlabel("decomposition steps on the downstream train split")
    axes[2].set_ylabel("average recall, full test split")
    axes[2].set_title("does the pre-trained start stay ahead?", fontsize=10)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fileio.save_figure_atomic(fig, path, dpi=90)


_COLOURS = {"red": "#d62728", "blue": "#1f77b4", "green": "#2ca02c", "yellow": "#e8c800", "black": "#222222",
            "white": "#f4f4f4", "brown": "#8c564b", "pink": "#f7a1c4"}


def _draw_scene(ax, scene: list[dict], correct: bool) -> None:
  """One demo image from its generator's description: objects as coloured boxes on the 3x3 grid."""
  from matplotlib.patches import Rectangle
  ax.set_xlim(0, 3)
  ax.set_ylim(3, 0)
  ax.set_aspect("equal")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_facecolor("#dddddd")
  for obj in scene:
    col, row = obj["cell"] % 3, obj["cell"] // 3
    side = 0.45 if obj["size"] == "small" else 0.85
    x, y = col + 0.5 - side / 2, row + 0.5 - side / 2
    ax.add_patch(Rectangle((x, y), side, side, facecolor=_COLOURS.get(obj["colour"], "grey"), edgecolor="k", lw=0.6))
    ax.text(col + 0.5, row + 0.5, obj["class"], ha="center", va="center", fontsize=5.5,
            color="white" if obj["colour"] in ("black", "blue", "brown", "red", "green") else "black")
  for spine in ax.spines.values():
    spine.set_edgecolor("#2ca02c" if correct else "#999999")
    spine.set_linewidth(3 if correct else 0.5)


def _plot_retrieval(report: dict, scenes: dict, path: str, num_queries: int = 3) -> None:
  """For a few test captions: the top-5 images of each model, drawn from their scene descriptions, the
  correct image framed in green."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pic = report["picture"]
  queries = list(range(0, min(len(pic["captions"]), 5 * num_queries), 5))[:num_queries]  # different images
  models = list(pic["top5"])
  rows = len(queries) * len(models)
  fig, axes = plt.subplots(rows, 5, figsize=(8.5, 1.5 * rows + 0.4), squeeze=False)
  for qi, q in enumerate(queries):
    for mi, model in enumerate(models):
      row = qi * len(models) + mi
      top = pic["top5"][model][q]
      for j in range(5):
        ax = axes[row, j]
        if j >= len(top):
          ax.axis("off")
          continue
        _draw_scene(ax, scenes.get(str(pic["image_ids"][top[j]]), []), top[j] == pic["txt2img"][q])
      axes[row, 0].set_ylabel(model, fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
      if mi == 0:
        axes[row, 0].set_title(f'caption: "{pic["captions"][q]}"', fontsize=8, loc="left")
  fig.suptitle("top-5 images per caption (left = best; green frame = the captioned image)", fontsize=9)
  fig.tight_layout(rect=(0.02, 0, 1, 0.98))
  fileio.save_figure_atomic(fig, path, dpi=100)


def _markdown(report: dict) -> str:
  t = report["timing"]
  dec, cross = t["split"]["decomposed"], t["split"]["cross_encoder"]
  data = report["data"]
  corpus, down = data["pretraining_corpus"], data["downstream"]
  lines = ["# VLDeformer demo: pre-train with early interaction, then decompose", "",
           f"Stage 1 trains a one-stream VL transformer with early interaction (image-text matching, ranking, "
           f"masked language modelling, image-text contrast) on a pre-training corpus of {corpus['images']:,} "
           f"generated demo-world images; every decomposition then trains on the downstream train split of "
           f"{down['train_images']:,} images only (the paper: VinVL pre-trained on 5.65M pairs, decomposed on "
           f"COCO's 113K images), and everything is tested on the downstream test split of {down['test_images']:,} "
           "images with 5 captions each.", "", f"How the two sets differ: {data['how_they_differ']}", "",
           "## Accuracy", "", comparison_table(report), "",
           f"- folds: {report['evaluation_sets']['folds']}",
           f"- full split: {report['evaluation_sets']['full_split']}"]
  if "reranked" in report:
    rr = report["reranked"]
    lines.append(f"- re-ranking: each image's top-{rr['rerank_top_k']} captions and each caption's top-"
                 f"{rr['rerank_top_k']} images re-scored by the stage-1 cross-encoder ({rr['pairs_scored']:,} pairs, "
                 f"{rr['rerank_seconds']:.1f} s: {rr['rerank_ms_per_query']:.2f} ms per query on this machine)")
  if "retrieval_modes" in report:
    rm = report["retrieval_modes"]
    lines += ["", "## Retrieval modes: recall, speed and memory (full test split)", "",
              f"The VLDeformer model's embeddings searched every way the project offers: exact float, int8 codes, "
              f"the sign bits, {rm['bits']}-bit SimHash and distilled codes (the head distilled on the train split) "
              f"with a float re-score of a 50-row Hamming shortlist, the top-{rm['rerank_k']} re-ranked by late "
              "interaction and by the stage-1 cross-encoder, and faiss IVF / HNSW. Queries per second: both "
              "directions' queries over the seconds of search and re-scoring (query encoding excluded) on this "
              "machine.", "", modes.markdown(rm["rows"]).rstrip()]
    lines += [f"- {n}" for n in rm["notes"]]
  lines += ["", "## Ablation: what makes decomposition work (full test split)", "",
            "| model | steps | batch | avg recall | 95% interval | rsum | train s |", "|---|---|---|---|---|---|---|"]
  for name, a in sorted(report["ablations"].items(), key=lambda kv: -kv[1]["avg_recall_full"]):
    secs = f"{a['train_seconds']:.0f}" if a.get("train_seconds") else "-"
    lines.append(f"| {a['label']} | {a['train_steps'] or '-'} | {a['train_batch'] or '-'} | "
                 f"{a['avg_recall_full']:.2f} | [{a['avg_recall_full_ci95'][0]:.2f}, {a['avg_recall_full_ci95'][1]:.2f}] "
                 f"| {a['rsum_full']:.1f} | {secs} |")
  if report["ablation_differences"]:
    lines += ["", "| question | difference (avg recall points) | 95% interval |", "|---|---|---|"]
    lines += [f"| {d['question']} | {d['avg_recall_difference']:+.2f} | {_ci(d['ci95'])} |"
              for d in report["ablation_differences"]]
    lines += ["", f"Intervals: {report['ablation_differences'][0]['method']}."]
  fine = {a["label"]: a["fine_grained"] for a in report["ablations"].values() if a.get("fine_grained")}
  if fine:
    lines += ["", "Telling an image from its look-alikes (full test split): of the captions whose image has "
              "siblings (other images with the same object classes, differing by a colour, a size or a position), "
              "the % ranked above every sibling, against the % ranked above every image with other classes:", "",
              "| model | above every sibling | above every other class set |", "|---|---|---|"]
    if report.get("cross_encoder_fine_grained"):
      cf = report["cross_encoder_fine_grained"]
      lines.append(f"| cross-encoder (stage 1), on the folds | {cf['above_every_sibling']:.1f} | "
                   f"{cf['above_every_other_class_set']:.1f} |")
    for label, f in fine.items():
      lines.append(f"| {label} | {f['above_every_sibling']:.1f} | {f['above_every_other_class_set']:.1f} |")
  if report.get("recall_vs_steps"):
    lines += ["", "Average recall on the full test split during decomposition (step: recall):", ""]
    for label, curve in report["recall_vs_steps"].items():
      lines.append(f"- {label}: " + ", ".join(f"{s}: {v:.1f}" for s, v in curve))
  lines += ["", "## Speed", "",
            f"Measured on the test split: the decomposed model encoded {dec['num_images']} images and "
            f"{dec['num_captions']} captions ({dec['per_image_s'] * 1e3:.3f} ms per image, "
            f"{dec['per_caption_s'] * 1e3:.3f} ms per caption); the cross-encoder scored {cross['sample_pairs']} "
            f"sampled (image, caption) pairs ({cross['per_pair_s'] * 1e3:.3f} ms per pair). Other gallery sizes "
            "are extrapolated from these rates (n images x 5n captions, every pair for the cross-encoder); the "
            "similarity search is timed at every size on random embeddings.", "",
            "| images | captions | cross-encoder s | decomposed s | speedup |", "|---|---|---|---|---|"]
  for r in t["vs_gallery_size"]:
    mark = " (extrapolated)" if r["cross_encoder_extrapolated"] else ""
    lines.append(f"| {r['num_images']} | {r['num_captions']} | {r['cross_encoder_s']:.1f}{mark} | "
                 f"{r['decomposed_s']:.2f} | {r['speedup']:,.0f}x |")
  lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in report["stage_seconds"].items() if isinstance(v, (int, float))]
  lines += ["", "Plots: `recall.png` (both models with the drop's interval; the ablation), `retrieval.png` "
            "(what each model retrieves), `curves.png` (training losses), `timing.png` (retrieval time "
            "against gallery size).", ""]
  return "\n".join(lines)


def write_report(workdir: str, report: dict, runs: dict, scenes: str | None = None,
                 labels: dict | None = None) -> dict[str, str]:
  """report.json, report.md and the PNGs in `workdir` (each written atomically)."""
  from vldeformer_jax.retrieval import timing
  names = ["report.json", "report.md", "curves.png", "recall.png", "timing.png"]
  if scenes and os.path.exists(scenes):
    names.append("retrieval.png")
  paths = {k: os.path.join(workdir, k) for k in names}
  _plot_curves(workdir, runs, labels or {n: a["label"] for n, a in report["ablations"].items()}, paths["curves.png"])
  _plot_recall(report, paths["recall.png"])
  timing.plot_vs_gallery_size(report["timing"], paths["timing.png"])
  if "retrieval.png" in paths:
    with open(scenes) as f:
      _plot_retrieval(report, json.load(f), paths["retrieval.png"])
  fileio.write_text_atomic(paths["report.md"], _markdown(report))
  fileio.write_json_atomic(paths["report.json"], report)
  return paths
