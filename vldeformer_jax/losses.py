"""The training objectives: the gathered contrastive loss of the decomposition stage, and the early-
interaction (stage 1) matching and masked-language-model losses.

Why the contrastive loss is written for the local rows of one device: it is the one place in training
with explicit collectives. Inside `jax.shard_map`, each device L2-normalises its own rows, all-gathers
the rows of every device (differentiably: `lax.all_gather` transposes to a reduce-scatter, so each
device's embeddings get the gradient of every device's queries; a `stop_gradient` there, as a plain
PyTorch gather does, gives wrong gradients), scores its local queries against the global pool, and
`pmean`s. The loss and its gradient then equal the single-device full-batch ones exactly, which is what
the released code gets from DataParallel's gather onto one GPU (spec 4.4). Called with `axis_name=None`
on whole arrays, the same function is the plain single-device loss.

The pool (spec 11.6): each text query is scored against all global images plus all global composed
negative images; each image query against all global captions plus all global composed negative
captions. Composed negatives are never queries. The positive of global row i is column i.

Objectives (`name`):
- `infonce` (spec 4.1): CE(t2i logits / temperature_t2i) + CE(i2t logits / temperature_i2t), each the
  mean over the queries, summed (no 0.5 factor).
- `hardness` (spec 4.3, Robinson et al. 2021): per query, the negatives of its pool row are importance-
  weighted by exp(beta * s / T) and debiased by the false-negative prior tau_plus; computed in log space,
  since exp(s / T) overflows float32 at the paper's T = 0.005. beta = tau_plus = 0 is InfoNCE.
- `hinge` (VSE++): relu(margin - s_pos + max over negatives of s), cosine similarities, no temperature;
  mean over queries per direction, summed.

`chunk_size > 0` scores the local queries in chunks of that many rows (`lax.map`, each chunk under
`jax.checkpoint`), so the full [rows x pool] logits never exist at once, in the forward or the backward
pass; the result is the same loss and the same gradients.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from vldeformer_jax.parallel import BATCH_AXES

Array = jax.Array
AxisName = str | Sequence[str] | None

LOSS_NAMES = ("infonce", "hardness", "hinge")


# ------------------------------------------------------------------------------------------------------
# Per-row objectives: (similarities of a chunk of queries vs the pool) -> per-row loss.


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) in float32, like torch.nn.functional.normalize."""
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _take(x: Array, labels: Array) -> Array:
  return jnp.take_along_axis(x, labels[:, None], axis=1)[:, 0]


def _infonce_rows(sim, labels, temperature, **_):
  x = sim / temperature
  return jax.nn.logsumexp(x, axis=1) - _take(x, labels)


def _hardness_rows(sim, labels, temperature, *, beta, tau_plus, **_):
  """-log(pos / (pos + Ng)) of spec 4.3 for each query row, in log space.

  With x = s / T over the M negatives of the row: reweighted = sum(e^{beta x} e^x) / mean(e^{beta x}),
  Ng = max((reweighted - tau_plus * M * e^{x_pos}) / (1 - tau_plus), M * e^{-1/T}). Every term stays a
  logarithm: at T = 0.005 the clamp M * e^{-1/T} underflows float32, and a clamped row must still get
  finite (zero) gradients through the unused branch.
  """
  x = sim / temperature
  is_pos = jnp.arange(x.shape[1])[None, :] == labels[:, None]
  num_neg = x.shape[1] - 1
  pos = _take(x, labels)
  log_m = math.log(num_neg)
  # Mask after scaling: beta may be 0, and 0 * -inf is nan.
  log_neg = (jax.nn.logsumexp(jnp.where(is_pos, -jnp.inf, (1.0 + beta) * x), axis=1)
             - jax.nn.logsumexp(jnp.where(is_pos, -jnp.inf, beta * x), axis=1) + log_m)
  if tau_plus:
    # log(reweighted - tau_plus * M * e^pos) = log(reweighted) + log(1 - e^d), defined when d < 0.
    d = pos + math.log(tau_plus * num_neg) - log_neg
    debiased = d < 0
    safe_d = jnp.where(debiased, d, -1.0)
    log_neg = jnp.where(debiased, log_neg + jnp.log(-jnp.expm1(safe_d)) - math.log1p(-tau_plus), -jnp.inf)
  log_neg = jnp.maximum(log_neg, log_m - 1.0 / temperature)
  return jnp.logaddexp(pos, log_neg) - pos


def _hinge_rows(sim, labels, temperature, *, margin, **_):
  del temperature  # the hinge works on cosine similarities
  is_pos = jnp.arange(sim.shape[1])[None, :] == labels[:, None]
  hardest = jnp.max(jnp.where(is_pos, -jnp.inf, sim), axis=1)
  return jax.nn.relu(margin - _take(sim, labels) + hardest)


_ROWS = {"infonce": _infonce_rows, "hardness": _hardness_rows, "hinge": _hinge_rows}


def _score_rows(queries, labels, pool, temperature, name, options, chunk_size):
  """Per-row (loss, correct) of queries [n, D] against pool [P, D]; chunked when chunk_size > 0."""
  row_fn = _ROWS[name]

  def rows(q, lab):
    sim = jnp.einsum("nd,pd->np", q, pool, precision=lax.Precision.HIGHEST)
    correct = (jnp.argmax(sim, axis=1) == lab).astype(jnp.float32)
    return row_fn(sim, lab, temperature, **options), correct

  n = queries.shape[0]
  if chunk_size <= 0 or chunk_size >= n:
    return rows(queries, labels)
  rows = jax.checkpoint(rows)
  num_chunks, main = n // chunk_size, (n // chunk_size) * chunk_size
  loss, correct = lax.map(
      lambda args: rows(*args),
      (queries[:main].reshape(num_chunks, chunk_size, -1), labels[:main].reshape(num_chunks, chunk_size)))
  loss, correct = loss.reshape(main), correct.reshape(main)
  if main < n:
    tail_loss, tail_correct = rows(queries[main:], labels[main:])
    loss = jnp.concatenate([loss, tail_loss])
    correct = jnp.concatenate([correct, tail_correct])
  return loss, correct


# ------------------------------------------------------------------------------------------------------
# The contrastive loss.


def _check(name: str, x: Array | None, ndim: int, rows: int, dim: int) -> None:
  if x is None:
    return
  if x.ndim != ndim or x.shape[0] != rows or x.shape[-1] != dim:
    want = "[b, D]" if ndim == 2 else "[b, K, D]"
    raise ValueError(f"contrastive_loss: {name} has shape {tuple(x.shape)}, expected {want} with "
                     f"b={rows}, D={dim}")


def contrastive_loss(text_emb: Array, image_emb: Array, neg_text_emb: Array | None = None,
                     neg_image_emb: Array | None = None, *, temperature_t2i: float | Array = 0.005,
                     temperature_i2t: float | Array = 0.005, name: str = "infonce", beta: float = 0.0,
                     tau_plus: float = 0.0, margin: float = 0.2, chunk_size: int = 0,
                     axis_name: AxisName = None) -> tuple[Array, dict[str, Array]]:
  """The decomposition loss of local rows (inside shard_map) or of a whole batch (`axis_name=None`).

  Args:
    text_emb, image_emb: [b, D] unnormalised embeddings; row r of both is a positive pair.
    neg_text_emb, neg_image_emb: [b, K, D] composed negatives of each pair, or None. Negative captions
      are extra columns of the image queries, negative images extra columns of the text queries.
    temperature_t2i, temperature_i2t: scalars (Python or traced, e.g. a learnable temperature) dividing
      the text->image and image->text logits (default: the paper's 0.005); unused by `hinge`.
    name: `infonce` | `hardness` | `hinge`. beta, tau_plus: `hardness` only (static floats, 0 <= tau_plus
      < 1). margin: `hinge` only. chunk_size: score the queries this many rows at a time (0: all).
    axis_name: mesh axis name or tuple of names the rows are split over (e.g. `BATCH_AXES`), or None.

  Returns:
    (loss, metrics), both global (identical on every device): `loss`, `t2i_loss`, `i2t_loss`,
    `t2i_accuracy`, `i2t_accuracy` (argmax over the pool is the positive), `pos_sim` (mean positive
    cosine), `neg_sim` (mean in-batch negative cosine), and with negatives `hard_neg_sim` (mean cosine of
    a query with its own composed negatives).
  """
  if name not in LOSS_NAMES:
    raise ValueError(f"contrastive_loss: unknown loss name {name!r}; expected one of {LOSS_NAMES}")
  if name == "hardness" and not 0.0 <= tau_plus < 1.0:
    raise ValueError(f"contrastive_loss: tau_plus must be in [0, 1), got {tau_plus}")
  if text_emb.ndim != 2:
    raise ValueError(f"contrastive_loss: text_emb has shape {tuple(text_emb.shape)}, expected [b, D]")
  b, dim = text_emb.shape
  _check("image_emb", image_emb, 2, b, dim)
  _check("neg_text_emb", neg_text_emb, 3, b, dim)
  _check("neg_image_emb", neg_image_emb, 3, b, dim)

  def gather(x):  # differentiable: its transpose sums every device's cotangent back to the owner
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)

  def mean(x):
    x = jnp.mean(x)
    return x if axis_name is None else lax.pmean(x, axis_name)

  t, v = l2_normalize(text_emb), l2_normalize(image_emb)
  nt = None if neg_text_emb is None else l2_normalize(neg_text_emb)
  nv = None if neg_image_emb is None else l2_normalize(neg_image_emb)
  t_all, v_all = gather(t), gather(v)
  global_rows = t_all.shape[0]
  image_pool, text_pool = [v_all], [t_all]
  if nv is not None:
    image_pool.append(gather(nv).reshape(-1, dim))
  if nt is not None:
    text_pool.append(gather(nt).reshape(-1, dim))
  image_pool = jnp.concatenate(image_pool) if len(image_pool) > 1 else v_all
  text_pool = jnp.concatenate(text_pool) if len(text_pool) > 1 else t_all
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * b
  labels = offset + jnp.arange(b)

  options = {"beta": beta, "tau_plus": tau_plus, "margin": margin}
  t2i_rows, t2i_correct = _score_rows(t, labels, image_pool, temperature_t2i, name, options, chunk_size)
  i2t_rows, i2t_correct = _score_rows(v, labels, text_pool, temperature_i2t, name, options, chunk_size)
  t2i_loss, i2t_loss = mean(t2i_rows), mean(i2t_rows)
  loss = t2i_loss + i2t_loss

  # Similarity statistics need no [b x pool] matrix: a text's summed similarity to every in-batch image
  # is its dot product with the sum of the images.
  t_sg, v_sg = lax.stop_gradient(t), lax.stop_gradient(v)
  pos_sim = mean(jnp.sum(t_sg * v_sg, axis=1))
  row_sums = jnp.dot(t_sg, lax.stop_gradient(jnp.sum(v_all, axis=0)), precision=lax.Precision.HIGHEST)
  neg_sim = (mean(row_sums) - pos_sim) / max(global_rows - 1, 1)
  metrics = {"loss": loss, "t2i_loss": t2i_loss, "i2t_loss": i2t_loss,
             "t2i_accuracy": mean(t2i_correct), "i2t_accuracy": mean(i2t_correct),
             "pos_sim": pos_sim, "neg_sim": neg_sim}
  hard = []
  if nv is not None:
    hard.append(mean(jnp.einsum("bd,bkd->bk", t_sg, lax.stop_gradient(nv))))
  if nt is not None:
    hard.append(mean(jnp.einsum("bd,bkd->bk", v_sg, lax.stop_gradient(nt))))
  if hard:
    metrics["hard_neg_sim"] = sum(hard) / len(hard)
  return loss, metrics


def sharded_contrastive_loss(mesh: Mesh, **loss_kwargs) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`contrastive_loss` over globally batch-sharded arrays, for use inside a jitted train step.

  Returns `fn(text_emb, image_emb, neg_text_emb, neg_image_emb, temps)`, where the negatives may be
  None, the embeddings are global arrays whose leading axis is split over `BATCH_AXES` (they are
  resharded if not) and `temps` is one scalar or a pair `(temperature_t2i, temperature_i2t)`, possibly traced.
  `loss_kwargs` are the other keyword arguments of `contrastive_loss` (name, beta, tau_plus, margin,
  chunk_size). The result (loss, metrics) is replicated; `jax.grad` through it is the full-batch
  gradient.

      loss_fn = sharded_contrastive_loss(mesh, name=cfg.loss.name, chunk_size=cfg.loss.chunk_size)
      def objective(params):                    # inside the jitted train step
        t = embed(params, texts)                # [G, D], batch-sharded by jit
        v = embed(params, images)
        nv = embed(params, neg_images_flat).reshape(G, K, -1)
        return loss_fn(t, v, None, nv, temps=(tau, tau))   # (loss, metrics)
      (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
  """
  bad = {"axis_name", "temperature_t2i", "temperature_i2t"} & set(loss_kwargs)
  if bad:
    raise ValueError(f"sharded_contrastive_loss: {sorted(bad)} are set by the wrapper; pass temperatures "
                     "as `temps` when calling")
  batch = P(BATCH_AXES)

  def fn(text_emb, image_emb, neg_text_emb, neg_image_emb, temps):
    if isinstance(temps, (tuple, list)):
      t2i, i2t = temps
    else:
      t2i = i2t = temps
    temps = (jnp.asarray(t2i, jnp.float32), jnp.asarray(i2t, jnp.float32))
    embs = {"text": text_emb, "image": image_emb}
    if neg_text_emb is not None:
      embs["neg_text"] = neg_text_emb
    if neg_image_emb is not None:
      embs["neg_image"] = neg_image_emb
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    for key, x in embs.items():
      if x.shape[0] % shards:
        raise ValueError(f"sharded_contrastive_loss: {key} embeddings have {x.shape[0]} rows, not "
                         f"divisible by the {shards} batch shards of mesh {dict(mesh.shape)}")

    def local(e, tt):
      return contrastive_loss(e["text"], e["image"], e.get("neg_text"), e.get("neg_image"),
                              temperature_t2i=tt[0], temperature_i2t=tt[1], axis_name=BATCH_AXES,
                              **loss_kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=({k: batch for k in embs}, (P(), P())),
                         out_specs=P(), check_vma=True)(embs, temps)

  return fn


# ------------------------------------------------------------------------------------------------------
# Stage 1 (early interaction): image-text matching and masked language modelling.


def match_loss(logits: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
  """Image-text matching: mean CE of logits [N, 2] against labels [N] (1 = matching pair)."""
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"match_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be "
                     "[N, C] and [N]")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  ce = jax.nn.logsumexp(logits, axis=-1) - _take(logits, labels)
  loss = jnp.mean(ce)
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"match_loss": loss, "match_accuracy": accuracy}


def mlm_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, dict[str, Array]]:
  """Masked LM: CE of logits [N, P, V] at the masked positions, weighted mean by weights [N, P].

  Labels at weight-0 positions are ignored (they may hold anything, e.g. -100). With no weight at all the
  loss and accuracy are 0.
  """
  if logits.ndim != 3 or labels.shape != logits.shape[:2] or weights.shape != labels.shape:
    raise ValueError(f"mlm_loss: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and weights "
                     f"{tuple(weights.shape)} must be [N, P, V], [N, P], [N, P]")
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  labels = jnp.where(weights > 0, labels, 0).astype(jnp.int32)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - label_logit
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  total = jnp.sum(weights)
  denom = jnp.where(total > 0, total, 1.0)
  loss = jnp.sum(ce * weights) / denom
  accuracy = jnp.sum(correct * weights) / denom
  return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy}
