"""Distilled binary codes (docs/method.md §7.6): a code head trained to reproduce a teacher's similarities.

What is distilled: the similarity structure of the frozen decomposed model. For a batch of n images and
one caption of each, the teacher's cosine similarities image-text, text-image, image-image and
text-text, divided by its training temperature, give four row-wise distributions (softmax over the batch,
self-pairs left out); the student's are the same rows computed from codes, s(a, b) = c_a . c_b / B in
[-1, 1] for c in {-1, +1}^B, times a learned scale. The loss is the mean KL(teacher || student) of those
rows: a listwise loss, because what a shortlist needs is each query's nearest rows in the right order, not
the exact cosine values (which a +-1 code of B bits cannot reproduce anyway). Optionally the early-
interaction cross-encoder teaches too (`cross_weight`): for sampled captions, its match margins over a
few candidate images (the float model's top candidates) give one more row distribution, so codes learn the
finer ordering the cross-encoder sees (JOG's joint teaching, ACM MM 2021).

The sign: forward with the exact bits, backward through tanh (straight-through, `relaxation='ste'`), so
the loss is computed on the codes that search will use; `relaxation='tanh'` trains with tanh(beta z)
instead, beta rising from 1 to `tanh_beta_final` (continuation, as in HashNet), and measures with signs.

Shared or separate heads: one projection W [D, B] for both modalities with a bias per modality
(`shared=True`, the default). The decomposed model already puts images and captions in one space trained
for their inner products, so one W keeps cross-modal Hamming distances meaningful by construction, with
half the parameters to fit from a small train split; the per-modality bias absorbs the modality gap (the
constant offset between the caption and image clouds), which otherwise makes a bit constant within one
modality and useless for cross-modal search. `shared=False` learns two projections (measured on the demo
split in the issue-20 report).

The head starts from the data-independent baseline of the same length (`binary_codes.sign_baseline_head`:
the D sign bits, or SimHash), so what training adds is measured against exactly where it started.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from vldeformer_jax.retrieval import binary_codes


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  bits: int = 128
  steps: int = 1500
  batch_images: int = 256  # images per step, each with one of its captions
  learning_rate: float = 3e-3
  teacher_temperature: float = 0.05  # the decomposed model's training temperature (demo: loss.temperature)
  relaxation: str = "ste"  # "ste" | "tanh"
  tanh_beta_final: float = 10.0
  shared: bool = True
  cross_weight: float = 0.0  # weight of the cross-encoder term (needs `CrossTeacher`)
  cross_temperature: float = 1.0  # on match margins
  cross_batch: int = 128  # captions per step for the cross-encoder term
  seed: int = 0


class CrossTeacher(NamedTuple):
  """The cross-encoder's margins on sampled pairs: caption `text_rows[m]` with images `image_rows[m]`."""
  text_rows: np.ndarray  # [M] caption rows of the training embeddings
  image_rows: np.ndarray  # [M, K] candidate image rows
  margins: np.ndarray  # [M, K] match-logit margins (Encoder.match_logit_margin_inputs)


def _codes(z, relaxation: str, beta):
  if relaxation == "ste":
    soft = jnp.tanh(z)
    return soft + jax.lax.stop_gradient(jnp.where(z >= 0, 1.0, -1.0) - soft)
  if relaxation == "tanh":
    return jnp.tanh(beta * z)
  return jnp.where(z >= 0, 1.0, -1.0)  # "sign": evaluation


def _row_kl(teacher_logits, student_logits, mask=None):
  """Mean over rows of KL(softmax(teacher) || softmax(student)); `mask` False entries are left out."""
  if mask is not None:
    teacher_logits = jnp.where(mask, teacher_logits, -jnp.inf)
    student_logits = jnp.where(mask, student_logits, -jnp.inf)
  p = jax.nn.softmax(teacher_logits, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
  log_q = jax.nn.log_softmax(student_logits, axis=-1)
  terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
  return jnp.mean(jnp.sum(terms, axis=-1))


def distillation_loss(params, img, txt, cfg: DistillConfig, beta=1.0, relaxation: str | None = None,
                      cross=None):
  """The loss of module docstring for a batch: img, txt [n, D] (caption i describes image i).

  `cross`: optional (caption embeddings [m, D], candidate image embeddings [m, K, D], margins [m, K]).
  """
  relaxation = relaxation or cfg.relaxation
  w_t = params["w"] if cfg.shared else params["w_text"]
  w_i = params["w"] if cfg.shared else params["w_image"]
  bits = w_i.shape[1]
  scale = jnp.exp(params["log_scale"])
  ci = _codes(img @ w_i + params["b_image"], relaxation, beta)
  ct = _codes(txt @ w_t + params["b_text"], relaxation, beta)
  t = 1.0 / cfg.teacher_temperature

  def student(a, b):
    return (a @ b.T) / bits * scale

  off_diag = ~jnp.eye(img.shape[0], dtype=bool)
  loss = (_row_kl(img @ txt.T * t, student(ci, ct)) + _row_kl(txt @ img.T * t, student(ct, ci))
          + _row_kl(img @ img.T * t, student(ci, ci), off_diag)
          + _row_kl(txt @ txt.T * t, student(ct, ct), off_diag)) / 4.0
  if cross is not None and cfg.cross_weight > 0:
    cap, cand, margins = cross
    cc = _codes(cap @ w_t + params["b_text"], relaxation, beta)  # [m, B]
    ck = _codes(cand @ w_i + params["b_image"], relaxation, beta)  # [m, K, B]
    s = jnp.einsum("mb,mkb->mk", cc, ck) / bits * scale
    loss = loss + cfg.cross_weight * _row_kl(margins / cfg.cross_temperature, s)
  return loss


def _init_params(dim: int, cfg: DistillConfig) -> dict:
  base = binary_codes.sign_baseline_head(dim, cfg.bits, cfg.seed).params
  params = {"b_image": base["b_image"], "b_text": base["b_text"],
            "log_scale": np.float32(np.log(1.0 / cfg.teacher_temperature))}
  if cfg.shared:
    params["w"] = base["w_image"]
  else:
    params["w_image"], params["w_text"] = base["w_image"], base["w_text"].copy()
  return jax.tree.map(jnp.asarray, params)


def _head(params, cfg: DistillConfig, meta: dict) -> binary_codes.CodeHead:
  p = jax.tree.map(np.asarray, params)
  w_i = p["w"] if cfg.shared else p["w_image"]
  w_t = p["w"] if cfg.shared else p["w_text"]
  return binary_codes.CodeHead({"w_image": w_i, "w_text": w_t, "b_image": p["b_image"], "b_text": p["b_text"]},
                               shared=cfg.shared, meta=meta)


def head_params(head: binary_codes.CodeHead, cfg: DistillConfig) -> dict:
  """A CodeHead as the parameter tree of `distillation_loss` (scale 1/T)."""
  p = {"b_image": jnp.asarray(head.params["b_image"]), "b_text": jnp.asarray(head.params["b_text"]),
       "log_scale": jnp.float32(np.log(1.0 / cfg.teacher_temperature))}
  if cfg.shared:
    p["w"] = jnp.asarray(head.params["w_image"])
  else:
    p["w_image"], p["w_text"] = jnp.asarray(head.params["w_image"]), jnp.asarray(head.params["w_text"])
  return p


def _caption_runs(txt2img: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """(caption rows sorted by image, start of each image's run in that order, captions per image)."""
  counts = np.bincount(txt2img, minlength=num_images)
  if np.any(counts == 0):
    raise ValueError(f"{int(np.sum(counts == 0))} images have no caption; each needs at least one")
  order = np.argsort(txt2img, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return order, starts, counts


def sign_loss(head: binary_codes.CodeHead, img: np.ndarray, txt: np.ndarray, txt2img: np.ndarray,
              cfg: DistillConfig, max_images: int = 512) -> float:
  """The distillation loss of `head` with exact sign codes on a fixed batch (the first `max_images` images
  and each one's first caption), at the best scale of a log grid: the scale is a nuisance parameter (a
  distilled head learns its own, the baseline has none), so each head is judged at its best. What the
  tests and the launcher report before / after."""
  order, starts, _ = _caption_runs(np.asarray(txt2img), len(img))
  n = min(len(img), max_images)
  p = head_params(head, cfg)
  im, tx = jnp.asarray(img[:n]), jnp.asarray(txt[order[starts[:n]]])

  def at(log_scale):
    return distillation_loss({**p, "log_scale": log_scale}, im, tx, cfg, relaxation="sign")

  grid = jnp.linspace(0.0, np.log(1000.0), 64, dtype=jnp.float32)
  return float(jnp.min(jax.lax.map(at, grid)))


def distill(image_emb: np.ndarray, text_emb: np.ndarray, txt2img: np.ndarray, cfg: DistillConfig, *,
            cross: CrossTeacher | None = None, progress: bool = True) -> tuple[binary_codes.CodeHead, dict]:
  """Trains a code head on frozen, L2-normalised embeddings (image_emb [N_img, D], text_emb [N_txt, D],
  txt2img [N_txt] image of each caption). Returns the head and a summary (loss with sign codes before and
  after on a fixed batch, the last training losses)."""
  img = np.asarray(image_emb, np.float32)
  txt = np.asarray(text_emb, np.float32)
  txt2img = np.asarray(txt2img, np.int64)
  if cfg.relaxation not in ("ste", "tanh"):
    raise ValueError(f"relaxation must be 'ste' or 'tanh', got {cfg.relaxation!r}")
  if cfg.cross_weight > 0 and cross is None:
    raise ValueError("cross_weight > 0 needs the cross-encoder's margins (CrossTeacher)")
  order, starts, counts = _caption_runs(txt2img, len(img))
  n = min(cfg.batch_images, len(img))
  params = _init_params(img.shape[1], cfg)
  baseline = binary_codes.sign_baseline_head(img.shape[1], cfg.bits, cfg.seed)
  before = sign_loss(baseline, img, txt, txt2img, cfg)
  opt = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, max(1, cfg.steps)))
  opt_state = opt.init(params)
  img_d, txt_d = jnp.asarray(img), jnp.asarray(txt)
  cross_d = None
  if cross is not None and cfg.cross_weight > 0:
    cross_d = (jnp.asarray(cross.text_rows), jnp.asarray(cross.image_rows), jnp.asarray(cross.margins, jnp.float32))

  @jax.jit
  def step(params, opt_state, rows, caps, beta, cross_idx):
    cross_batch = None
    if cross_d is not None:
      t_rows, i_rows, margins = cross_d
      cross_batch = (txt_d[t_rows[cross_idx]], img_d[i_rows[cross_idx]], margins[cross_idx])
    loss, grads = jax.value_and_grad(distillation_loss)(params, img_d[rows], txt_d[caps], cfg, beta,
                                                        cross=cross_batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(cfg.seed)
  losses = []
  for s in tqdm(range(cfg.steps), desc=f"distil {cfg.bits}-bit codes", disable=not progress):
    rows = rng.choice(len(img), n, replace=False)
    caps = order[starts[rows] + rng.integers(0, counts[rows])]
    beta = 1.0 + (cfg.tanh_beta_final - 1.0) * s / max(1, cfg.steps - 1)
    cross_idx = rng.integers(0, len(cross.text_rows), cfg.cross_batch) if cross_d is not None else np.zeros(1, int)
    params, opt_state, loss = step(params, opt_state, rows, caps, np.float32(beta), cross_idx)
    losses.append(float(loss))
  summary = {"bits": cfg.bits, "steps": cfg.steps, "sign_loss_before": before,
             "train_loss_last": float(np.mean(losses[-50:])) if losses else None,
             "config": dataclasses.asdict(cfg)}
  head = _head(params, cfg, {"kind": "distilled", **{k: v for k, v in summary.items() if k != "config"},
                              "config": dataclasses.asdict(cfg)})
  summary["sign_loss_after"] = sign_loss(head, img, txt, txt2img, cfg)
  head.meta["sign_loss_after"] = summary["sign_loss_after"]
  return head, summary


def cross_teacher(encoder, gallery, image_emb: np.ndarray, text_emb: np.ndarray, num_captions: int = 1000,
                  candidates: int = 8, seed: int = 0, batch_size: int | None = None) -> CrossTeacher:
  """The cross-encoder's margins for `num_captions` sampled captions of `gallery` over their `candidates`
  nearest images by the float embeddings (the pairs a shortlist has to order; random pairs would be
  trivially far apart). `encoder` must have a trained match head (retrieval.pairs.score_pairs)."""
  from vldeformer_jax.retrieval.pairs import score_pairs
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.choice(len(text_emb), min(num_captions, len(text_emb)), replace=False))
  sim = np.asarray(text_emb[rows], np.float32) @ np.asarray(image_emb, np.float32).T
  cand = np.argsort(-sim, axis=1, kind="stable")[:, :candidates]
  text_all = gallery.text_inputs(encoder, rows)
  margins = np.empty(cand.shape, np.float32)
  uniq = np.unique(cand)
  for a in tqdm(range(0, len(uniq), 64), desc="cross-encoder teacher"):
    imgs = uniq[a:a + 64]
    img_x = gallery.image_inputs(encoder, imgs)
    q, slot = np.nonzero(np.isin(cand, imgs))
    local = np.searchsorted(imgs, cand[q, slot])
    margins[q, slot] = score_pairs(encoder, text_all, img_x, q, local, batch_size)
  return CrossTeacher(rows, cand, margins)


def run_distillation(export: str, data_dir: str, dataset: str, split: str, output: str, *, bits: int = 128,
                     steps: int = 1500, shared: bool = True, relaxation: str = "ste", cross_export: str | None = None,
                     cross_weight: float = 0.0, batch_size: int = 64, seed: int = 0) -> dict:
  """launch/distill_codes.py: embed `split` with `export`, distil a `bits`-bit head, save it to `output`
  (with the export's fingerprint). `cross_export` + `cross_weight` > 0: the cross-encoder teaches too."""
  from vldeformer_jax.data import prepare
  from vldeformer_jax.io.export import UntrainedHeadError
  from vldeformer_jax.retrieval.encoder import Encoder
  from vldeformer_jax.retrieval.gallery import embed_gallery, load_gallery

  cfg = DistillConfig(bits=bits, steps=steps, shared=shared, relaxation=relaxation, cross_weight=cross_weight,
                      seed=seed)
  if cross_weight > 0 and not cross_export:
    raise ValueError("--cross_weight > 0 needs --cross_export (an export with a trained match head)")
  if cross_export and cross_weight <= 0:  # else the head's file would name a teacher that taught nothing
    raise ValueError(f"--cross_export needs --cross_weight > 0, got {cross_weight}")
  encoder = Encoder.load(export, batch_size=batch_size)
  gallery = load_gallery(prepare.load_split(data_dir, dataset, split))
  img, txt, _ = embed_gallery(encoder, gallery, batch_size)
  cross = None
  if cross_weight > 0:
    teacher = Encoder.load(cross_export, batch_size=batch_size)
    if teacher.match_head_error:
      raise UntrainedHeadError(teacher.match_head_error)
    cross = cross_teacher(teacher, gallery, img, txt, seed=seed, batch_size=batch_size)
  head, summary = distill(img, txt, gallery.txt2img, cfg, cross=cross)
  binary_codes.save_code_head(output, head, encoder.fingerprint, export=export, dataset=dataset, split=split,
                              cross_export=cross_export)
  summary.update(output=output, export_fingerprint=encoder.fingerprint)
  return summary
