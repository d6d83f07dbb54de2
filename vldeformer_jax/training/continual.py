"""Continual retrieval (Wang et al., 2021): train a sequence of tasks, index each task's gallery as it comes,
and measure every task after each, for the index policies `keep` and `reindex` (retrieval/index.add_items).

Training is plain sequential fine-tuning: task i starts from task i-1's export (task 0 from the config's
`init_export`, or random weights). The training sequence is shared; the policies differ only in the index:
- `keep`: task i's test images are encoded by encoder i and added; older entries stay as encoder j encoded
  them (a mixed index, queried by the newest encoder);
- `reindex`: every entry is re-encoded by encoder i when task i's images are added.
R[policy][i, j] = text-to-image R@1 (percent) of task j's captions (encoded by encoder i) against task j's
entries of the index after task i (for j > i, not yet indexed: task j's images encoded by encoder i).
Writes `<workdir>/continual.json`: per policy the R matrix, average accuracy, forgetting, backward transfer
(retrieval/continual.py), and the tasks.
"""
from __future__ import annotations

import copy
import os

import numpy as np

from vldeformer_jax.data import prepare
from vldeformer_jax.io.files import write_json_atomic
from vldeformer_jax.retrieval import continual, metrics
from vldeformer_jax.retrieval import index as index_lib
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.retrieval.gallery import load_gallery
from vldeformer_jax.training.loop import train_and_evaluate

POLICIES = ("keep", "reindex")


def _embed_images(encoder, gallery) -> np.ndarray:
  return encoder.embed_image_inputs(gallery.image_inputs(encoder, range(gallery.num_images)))


def _t2i_r1(encoder, gallery, image_emb) -> float:
  txt = encoder.embed_text_inputs(gallery.text_inputs(encoder))
  sim = np.asarray(image_emb, np.float32) @ txt.T
  return metrics.retrieval_metrics(sim, gallery.txt2img)["t2i"]["R@1"]


def run_continual(config, workdir: str, tasks: list[dict], policies=POLICIES, split: str = "test") -> dict:
  """`tasks`: [{"name", "data_dir"}] prepared datasets, trained in order; see the module docstring."""
  workdir = os.path.abspath(workdir)
  galleries = [load_gallery(prepare.load_split(t["data_dir"], t["name"], split)) for t in tasks]
  # An entry is (task, image_id): its text is "task<j>" (datasets of one world seed may share image ids).
  n = len(tasks)
  r = {p: np.zeros((n, n)) for p in policies}
  init = config.get("init_export", "") or ""
  for i, task in enumerate(tasks):
    cfg = copy.deepcopy(config)
    cfg.data.name, cfg.data.data_dir, cfg.data.generate = task["name"], task["data_dir"], ""
    cfg.init_export = init
    task_dir = os.path.join(workdir, f"task{i}")
    train_and_evaluate(cfg, task_dir)
    init = os.path.join(task_dir, "export")
    enc = Encoder.load(init)
    new = _embed_images(enc, galleries[i])

    def reencode(ids, texts, enc=enc):
      out = np.empty((len(ids), enc.model_config.embed_dim), np.float32)
      for j in sorted({int(t[len("task"):]) for t in texts}):
        rows = [k for k, t in enumerate(texts) if t == f"task{j}"]
        pos = {int(x): p for p, x in enumerate(galleries[j].image_ids)}
        out[rows] = _embed_images(enc, galleries[j])[[pos[int(ids[k])] for k in rows]]
      return out

    for policy in policies:
      path = os.path.join(workdir, f"index_{policy}")
      texts = [f"task{i}"] * len(new)
      if i == 0:
        index_lib.write_index(path, new, galleries[0].image_ids, texts, fingerprint=enc.fingerprint,
                              side="images", overwrite=True)
      else:
        index_lib.add_items(path, new, galleries[i].image_ids, texts, fingerprint=enc.fingerprint,
                            policy=policy, reencode=reencode)
      idx = index_lib.Index.load(path)
      for j, g in enumerate(galleries):
        if j <= i:
          pos = {(t, int(x)): k for k, (t, x) in enumerate(zip(idx.texts, idx.ids))}
          emb = np.asarray(idx.embeddings)[[pos[(f"task{j}", int(x))] for x in g.image_ids]]
        else:
          emb = _embed_images(enc, g)
        r[policy][i, j] = _t2i_r1(enc, g, emb)
  result = {"tasks": tasks, "metric": "t2i R@1", "split": split,
            "policies": {p: continual.summary(r[p]) for p in policies}}
  write_json_atomic(os.path.join(workdir, "continual.json"), result)
  return result


def format_continual(result: dict) -> str:
  """The R matrices and their summaries, one block per policy."""
  lines = []
  for policy, s in result["policies"].items():
    lines.append(f"{policy}: R[i, j] ({result['metric']}; row i = after task i, column j = task j)")
    lines.extend("  " + " ".join(f"{v:7.2f}" for v in row) for row in s["R"])
    lines.append(f"  average accuracy {s['average_accuracy']:.2f}, forgetting {s['forgetting']:.2f}, "
                 f"backward transfer {s['backward_transfer']:.2f}")
  return "\n".join(lines)
