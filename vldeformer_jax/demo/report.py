"""The demo's report: the accuracy and speed comparison as report.json, report.md and PNG plots.

Kept apart from the orchestration (demo.py) so the numbers can be re-rendered from the saved results
without training anything: `write_report(workdir, build_report(...), runs)`. Every number in the report
names the set it was measured on (the cross-encoder subset or the full test split), and extrapolated
timings are marked as such.
"""
from __future__ import annotations

import os

from vldeformer_jax.io import files as fileio

RECALL_KEYS = [(d, k) for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10")]


def avg_recall(result: dict) -> float:
  """Mean of the six R@K (i2t and t2i R@1/5/10), in points (rsum / 6)."""
  return float(sum(result[d][k] for d, k in RECALL_KEYS) / len(RECALL_KEYS))


def _strip(result: dict) -> dict:
  return {k: v for k, v in result.items() if not k.startswith("_")}


def build_report(results: dict, timing: dict, stage_seconds: dict, runs: dict, descriptions: dict, *,
                 main: str) -> dict:
  """The report.json dict: headline comparison, ablations, timing, and how each number was measured."""
  cross = _strip(results["cross_encoder"])
  dec_sub = _strip(results["decomposed"][main]["subset"])
  dec_full = _strip(results["decomposed"][main]["full"])
  n_sub, n_split = results["subset_images"], results["split_images"]
  ablations = {}
  for name, r in results["decomposed"].items():
    ablations[name] = {
        "description": descriptions.get(name, name),
        "avg_recall_subset": avg_recall(r["subset"]), "rsum_subset": r["subset"]["rsum"],
        "avg_recall_full": avg_recall(r["full"]), "rsum_full": r["full"]["rsum"],
        "train_steps": int(runs[name][0].train.num_steps) if name in runs else 0,
        "train_seconds": stage_seconds.get(name),
    }
  return {
      "cross_encoder": cross,
      "decomposed": dec_sub,
      "decomposed_full_split": dec_full,
      "avg_recall_cross_encoder": avg_recall(cross),
      "avg_recall_decomposed": avg_recall(dec_sub),
      "avg_recall_drop": avg_recall(cross) - avg_recall(dec_sub),
      "speedup": timing["speedup"],
      "speedup_gallery": timing["speedup_gallery"],
      "evaluation_sets": {
          "cross_encoder": f"first {n_sub} images of the '{results['split']}' split and their captions",
          "decomposed": f"the same first {n_sub} images and captions",
          "decomposed_full_split": f"all {n_split} images of the '{results['split']}' split and their captions",
      },
      "ablations": ablations,
      "timing": timing,
      "stage_seconds": stage_seconds,
  }


def _fmt_row(name: str, m: dict) -> str:
  cells = " | ".join(f"{m[d][k]:.2f}" for d, k in RECALL_KEYS)
  return f"| {name} | {cells} | {avg_recall(m):.2f} | {m['rsum']:.1f} |"


def comparison_table(report: dict) -> str:
  """The headline table: cross-encoder vs decomposed on the same subset, and the speedup."""
  head = "| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | avg recall | rsum |\n|---|---|---|---|---|---|---|---|---|"
  n_sub = report["cross_encoder"]["num_images"]
  lines = [f"Cross-encoder vs decomposed on the same {n_sub} test images "
           f"({report['cross_encoder']['num_captions']} captions):", head,
           _fmt_row("stage 1: early-interaction cross-encoder", report["cross_encoder"]),
           _fmt_row("stage 2: decomposed (VLDeformer)", report["decomposed"]),
           f"\naverage recall drop: {report['avg_recall_drop']:.2f} points (cross-encoder minus decomposed)",
           f"retrieval speedup for a {report['speedup_gallery']} gallery: {report['speedup']:.0f}x "
           "(cross-encoder side extrapolated from a timed sample)"]
  return "\n".join(lines)


def _plot_curves(workdir: str, runs: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from vldeformer_jax.training.metric_writers import read_metrics

  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for name, (_, run_dir) in runs.items():
    recs = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("split", "train") == "train"]
    if not recs:
      continue
    ax = axes[0] if name == "stage1" else axes[1]
    keys = ("itm_loss", "rank_loss", "itc_loss", "mlm_loss") if name == "stage1" else ("loss",)
    for key in keys:
      pts = [(r["step"], r[key]) for r in recs if key in r]
      if pts:
        ax.plot(*zip(*pts), label=f"{name} {key}" if name == "stage1" else name)
  axes[0].set_title("stage 1: early interaction (its loss terms)")
  axes[1].set_title("stage 2: decomposition (InfoNCE)")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fileio.save_figure_atomic(fig, path, dpi=90)


def _plot_recall(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  labels = [f"{d} {k}" for d, k in RECALL_KEYS]
  series = [("cross-encoder (stage 1)", report["cross_encoder"]), ("decomposed (stage 2)", report["decomposed"])]
  fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
  x = np.arange(len(labels))
  for i, (name, m) in enumerate(series):
    axes[0].bar(x + (i - 0.5) * 0.38, [m[d][k] for d, k in RECALL_KEYS], 0.38, label=name)
  axes[0].set_xticks(x, labels, fontsize=8)
  axes[0].set_ylabel("recall (%)")
  axes[0].set_title(f"same {report['cross_encoder']['num_images']} test images")
  axes[0].legend(fontsize=8)
  names = list(report["ablations"])
  y = np.arange(len(names))
  axes[1].barh(y - 0.2, [report["ablations"][n]["avg_recall_subset"] for n in names], 0.4, label="subset")
  axes[1].barh(y + 0.2, [report["ablations"][n]["avg_recall_full"] for n in names], 0.4, label="full split")
  axes[1].axvline(report["avg_recall_cross_encoder"], color="k", ls="--", lw=1, label="cross-encoder (subset)")
  axes[1].set_yticks(y, names, fontsize=7)
  axes[1].set_xlabel("average recall (mean of six R@K)")
  axes[1].set_title("decomposed models (ablations)")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fileio.save_figure_atomic(fig, path, dpi=90)


def _markdown(report: dict) -> str:
  t = report["timing"]
  dec, cross = t["split"]["decomposed"], t["split"]["cross_encoder"]
  ev = report["evaluation_sets"]
  lines = ["# VLDeformer demo: early interaction, then decomposition", "",
           "Stage 1 trains a one-stream VL transformer with early interaction (image-text matching against "
           "batch negatives, masked language modelling, and the terms its config adds) on the synthetic demo "
           "data; stage 2 decomposes it with the contrastive objective and bi-modal hard negatives into an "
           "encoder that reads one modality at a time.", "",
           "## Accuracy", "", comparison_table(report), "",
           f"- cross-encoder: {ev['cross_encoder']}", f"- decomposed: {ev['decomposed']}",
           f"- the decomposed model on the full split ({ev['decomposed_full_split']}): average recall "
           f"{avg_recall(report['decomposed_full_split']):.2f}, rsum {report['decomposed_full_split']['rsum']:.1f} "
           "(no cross-encoder number on the full split: every pair is too slow on this machine).", "",
           "## Ablations (decomposition)", "",
           "| model | init / negatives | avg recall (subset) | rsum (subset) | avg recall (full split) | rsum (full) | steps | train s |",
           "|---|---|---|---|---|---|---|---|"]
  for name, a in report["ablations"].items():
    secs = f"{a['train_seconds']:.0f}" if a.get("train_seconds") else "-"
    lines.append(f"| {name} | {a['description']} | {a['avg_recall_subset']:.2f} | {a['rsum_subset']:.1f} | "
                 f"{a['avg_recall_full']:.2f} | {a['rsum_full']:.1f} | {a['train_steps']} | {secs} |")
  lines += ["", f"Cross-encoder average recall on the subset: {report['avg_recall_cross_encoder']:.2f}.", "",
            "## Speed", "",
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
                 f"{r['decomposed_s']:.2f} | {r['speedup']:.0f}x |")
  lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in report["stage_seconds"].items() if isinstance(v, (int, float))]
  lines += ["", "Plots: `curves.png` (training losses), `recall.png` (recall of both models, ablations), "
            "`timing.png` (retrieval time against gallery size).", ""]
  return "\n".join(lines)


def write_report(workdir: str, report: dict, runs: dict) -> dict[str, str]:
  """report.json, report.md, curves.png, recall.png, timing.png in `workdir` (each written atomically)."""
  from vldeformer_jax.retrieval import timing
  paths = {k: os.path.join(workdir, k) for k in ("report.json", "report.md", "curves.png", "recall.png",
                                                 "timing.png")}
  _plot_curves(workdir, runs, paths["curves.png"])
  _plot_recall(report, paths["recall.png"])
  timing.plot_vs_gallery_size(report["timing"], paths["timing.png"])
  fileio.write_text_atomic(paths["report.md"], _markdown(report))
  fileio.write_json_atomic(paths["report.json"], report)
  return paths
