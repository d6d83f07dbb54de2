"""The training objectives: the gathered contrastive loss of the decomposition stage, and the early-
interaction (stage 1) matching and masked-language-model losses.

Why the contrastive loss is written for the local rows of one device: it is the one place in training
with explicit collectives. Inside `jax.shard_map`, each device takes the inverse norms of its own rows,
all-gathers the rows (and inverse norms) of every device (differentiably: `lax.all_gather` transposes to a reduce-scatter, so each
device's embeddings get the gradient of every device's queries; a `stop_gradient` there, as a plain
PyTorch gather does, gives wrong gradients), scores its local queries against the global pool, and
`pmean`s. The loss and its gradient then equal the single-device full-batch ones exactly, which is what
the released code gets from DataParallel's gather onto one GPU (docs/method.md §4.4). Called with `axis_name=None`
on whole arrays, the same function is the plain single-device loss.

The pool (docs/method.md §5.3): each text query is scored against all global images plus all global composed
negative images; each image query against all global captions plus all global composed negative
captions. Composed negatives are never queries. The positive of global row i is column i.

Objectives (`name`):
- `infonce` (docs/method.md §4.1): CE(t2i logits / temperature_t2i) + CE(i2t logits / temperature_i2t), each the
  mean over the queries, summed (no 0.5 factor).
- `hardness` (docs/method.md §4.2, Robinson et al. 2021): per query, the negatives of its pool row are importance-
  weighted by exp(beta * s / T) and debiased by the false-negative prior tau_plus; computed in log space,
  since exp(s / T) overflows float32 at the paper's T = 0.005. beta = tau_plus = 0 is InfoNCE.
- `hinge` (VSE++): relu(margin - s_pos + max over negatives of s), cosine similarities, no temperature;
  mean over queries per direction, summed.
- `sigmoid` (docs/method.md §4.7, SigLIP, Zhai et al. 2023): every caption-image pair an independent binary
  term -log sigmoid(z (s / temperature + bias)), z = 1 on the diagonal and -1 elsewhere, composed negatives
  as extra negative pairs, summed and divided by the global batch size. `sigmoid_loss` computes it block by
  block as the caption blocks rotate around the batch axes (`lax.ppermute`): no device ever holds the
  gathered pool, in the forward or the backward pass (its gradient is a custom VJP that rotates the blocks
  again, each block's gradient travelling with it back to its owner).

`chunk_size > 0` scores the local queries in chunks of that many rows (`lax.map`, each chunk under
`jax.checkpoint`), so the full [rows x pool] logits never exist at once, in the forward or the backward
pass; the result is the same loss and the same gradients. Beyond the chunk's blocks, the working memory
is kept to the gradient accumulators: embeddings are never normalised into copies (similarities are raw
dot products scaled by inverse norms), the pool's parts are never concatenated, and the positives are
not picked out of the blocks (see `_score_rows`). At a 64K-pair pool with one composed negative per side
(768-d, chunks of 256) XLA plans 0.88 GiB of temporaries, against 2.0 GiB with normalised, concatenated
pools (benchmarks/contrastive_memory.py).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from vldeformer_jax.parallel import BATCH_AXES
from vldeformer_jax.retrieval import late_interaction

Array = jax.Array
AxisName = str | Sequence[str] | None

CONTRASTIVE_NAMES = ("infonce", "hardness", "hinge")  # softmax-family objectives of `contrastive_loss`
LOSS_NAMES = CONTRASTIVE_NAMES + ("sigmoid",)          # `sigmoid`: `sigmoid_loss`
SIGMOID_BIAS_INIT = -10.0  # SigLIP's initial bias (with temperature 0.1): the loss starts near log 2 per pair


# ------------------------------------------------------------------------------------------------------
# Per-row objectives: (similarities of a chunk of queries vs the pool) -> per-row loss.
#
# The pool comes in parts (the in-batch columns, then the composed-negative columns), each scored on its
# own and combined by logaddexp / max: concatenating them would copy the whole [pool, D] pool (and its
# gradient) once more. The positive of each query is a column of the first part.


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) in float32, like torch.nn.functional.normalize."""
  x = x.astype(jnp.float32)
  return x * inverse_norm(x, eps)[..., None]


def inverse_norm(x: Array, eps: float = 1e-12) -> Array:
  """1 / max(||x||, eps) over the last axis, in float32: what l2_normalize multiplies by."""
  x = x.astype(jnp.float32)
  return lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def _take(x: Array, labels: Array) -> Array:
  return jnp.take_along_axis(x, labels[:, None], axis=1)[:, 0]


def _is_pos(x: Array, labels: Array) -> Array:
  return jnp.arange(x.shape[1])[None, :] == labels[:, None]


def _logsumexp(parts: Sequence[Array]) -> Array:
  """Row-wise logsumexp over the columns of all parts."""
  out = jax.nn.logsumexp(parts[0], axis=1)
  for x in parts[1:]:
    out = jnp.logaddexp(out, jax.nn.logsumexp(x, axis=1))
  return out


# Each objective gets `xs`, the [n, P_i] parts of the query rows against the pool, and `pos`, each row's
# positive (column `labels` of the first part, computed apart as a [n]-vector: picking it out of the
# [n, P] block would cost a [n, P] scatter in the backward pass). For `infonce` and `hardness` both are
# logits (cosine / temperature), for `hinge` cosines.


def _infonce_rows(xs, pos, labels, temperature, **_):
  del labels, temperature
  return _logsumexp(xs) - pos


def _hardness_rows(xs, pos, labels, temperature, *, beta, tau_plus, **_):
  """-log(pos / (pos + Ng)) of docs/method.md §4.2 for each query row, in log space.

  With x = s / T over the M negatives of the row: reweighted = sum(e^{beta x} e^x) / mean(e^{beta x}),
  Ng = max((reweighted - tau_plus * M * e^{x_pos}) / (1 - tau_plus), M * e^{-1/T}). Every term stays a
  logarithm: at T = 0.005 the clamp M * e^{-1/T} underflows float32, and a clamped row must still get
  finite (zero) gradients through the unused branch.
  """
  is_pos = _is_pos(xs[0], labels)
  num_neg = sum(x.shape[1] for x in xs) - 1
  log_m = math.log(num_neg)

  def negatives(scale):  # mask after scaling: beta may be 0, and 0 * -inf is nan
    return [jnp.where(is_pos, -jnp.inf, scale * xs[0])] + [scale * x for x in xs[1:]]

  log_neg = _logsumexp(negatives(1.0 + beta)) - _logsumexp(negatives(beta)) + log_m
  if tau_plus:
    # log(reweighted - tau_plus * M * e^pos) = log(reweighted) + log(1 - e^d), defined when d < 0.
    d = pos + math.log(tau_plus * num_neg) - log_neg
    debiased = d < 0
    safe_d = jnp.where(debiased, d, -1.0)
    log_neg = jnp.where(debiased, log_neg + jnp.log(-jnp.expm1(safe_d)) - math.log1p(-tau_plus), -jnp.inf)
  log_neg = jnp.maximum(log_neg, log_m - 1.0 / temperature)
  return jnp.logaddexp(pos, log_neg) - pos


def _hinge_rows(sims, pos, labels, temperature, *, margin, **_):
  del temperature  # the hinge works on cosine similarities
  hardest = jnp.max(jnp.where(_is_pos(sims[0], labels), -jnp.inf, sims[0]), axis=1)
  for s in sims[1:]:
    hardest = jnp.maximum(hardest, jnp.max(s, axis=1))
  return jax.nn.relu(margin - pos + hardest)


_ROWS = {"infonce": _infonce_rows, "hardness": _hardness_rows, "hinge": _hinge_rows}


def _correct(xs, labels):
  """1.0 where the first maximum over the concatenated parts is the positive (argmax's tie rule)."""
  first = xs[0]
  correct = jnp.argmax(first, axis=1) == labels
  if len(xs) > 1:
    rest = functools.reduce(jnp.maximum, [jnp.max(x, axis=1) for x in xs[1:]])
    correct &= jnp.max(first, axis=1) >= rest
  return correct.astype(jnp.float32)


@jax.custom_vjp
def _scaled_dot(q: Array, p: Array, p_inv: Array) -> Array:
  """(q @ p.T) * p_inv: queries [n, D] against raw pool rows [P, D] scaled by their inverse norms [P].

  The custom gradient takes the pool's two cotangents from one [P, D] product G = g.T @ q: d p = G * p_inv
  and d p_inv = rowsum(G * p) (since sum_n g[n, j] (q_n . p_j) = p_j . G_j). Autodiff would instead form
  the [n, P] product g * (q @ p.T) for d p_inv, one more block-sized buffer per pool part and chunk.
  """
  return jnp.einsum("nd,pd->np", q, p, precision=lax.Precision.HIGHEST) * p_inv[None, :]


def _scaled_dot_fwd(q, p, p_inv):
  return _scaled_dot(q, p, p_inv), (q, p, p_inv)


def _scaled_dot_bwd(res, g):
  q, p, p_inv = res
  dq = jnp.einsum("np,pd->nd", g * p_inv[None, :], p, precision=lax.Precision.HIGHEST)
  big_g = jnp.einsum("np,nd->pd", g, q, precision=lax.Precision.HIGHEST)
  return dq, big_g * p_inv[:, None], jnp.sum(big_g * p, axis=1)


_scaled_dot.defvjp(_scaled_dot_fwd, _scaled_dot_bwd)


def _score_rows(text, image, pools, temperatures, labels, name, options, chunk_size):
  """Per-row (loss, correct) of the text->image and the image->text queries; chunked when chunk_size > 0.

  `text`, `image`: (raw local rows [n, D], inverse norms [n]), the queries of the two directions and
  each other's positives; `pools`: per direction, a list of (raw rows [P_i, D], inverse norms [P_i])
  parts; `temperatures`: per direction. Cosine similarities are raw dot products scaled by both inverse
  norms, the query's (and 1 / temperature) applied to the [chunk, D] queries, the pool's to the
  [chunk, P_i] products: no normalised copy of the queries or of the pool, nor of their gradients, is
  ever materialised (at a 64K-pair pool, each copy is 192 MiB).

  Chunked, one `lax.map` per direction steps over chunk indices and slices each chunk's rows out of the
  local arrays inside the rematerialised body: the backward pass then adds every chunk's query gradient
  into the [n, D] gradient accumulator of the local rows instead of stacking per-chunk query gradients
  beside it. The two directions run as two loops, not one: in one loop body XLA overlaps them and keeps
  twice the [chunk, P_i] blocks alive (1.4 GiB instead of 0.9 at 64K pairs).
  """
  row_fn = _ROWS[name]
  scaled = name != "hinge"  # the hinge works on cosines, the others on logits

  def direction(d, t, t_inv, v, v_inv, lab):
    pair = jnp.sum(t * v, axis=1) * t_inv * v_inv  # cosine of each query with its positive
    q, q_inv = (t, t_inv) if d == 0 else (v, v_inv)
    pool, temp = pools[d], temperatures[d]
    scale = q_inv / temp if scaled else q_inv
    q = q * scale[:, None]
    xs = [_scaled_dot(q, p, p_inv) for p, p_inv in pool]
    pos = pair / temp if scaled else pair
    return row_fn(xs, pos, lab, temp, **options), _correct(xs, lab)

  n = labels.shape[0]
  if chunk_size <= 0 or chunk_size >= n:
    return [direction(d, *text, *image, labels) for d in (0, 1)]

  num_chunks, main = n // chunk_size, (n // chunk_size) * chunk_size
  out = []
  def chunk(d, i):
    take = lambda x: lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size)  # noqa: E731
    return direction(d, *map(take, (*text, *image, labels)))

  for d in (0, 1):
    loss, correct = lax.map(jax.checkpoint(functools.partial(chunk, d)), jnp.arange(num_chunks))
    loss, correct = loss.reshape(main), correct.reshape(main)
    if main < n:
      t_loss, t_correct = direction(d, *(x[main:] for x in (*text, *image, labels)))
      loss, correct = jnp.concatenate([loss, t_loss]), jnp.concatenate([correct, t_correct])
    out.append((loss, correct))
  return out


# ------------------------------------------------------------------------------------------------------
# The contrastive loss.


def _check(name: str, x: Array | None, ndim: int, rows: int, dim: int) -> None:
  if x is None:
    return
  if x.ndim != ndim or x.shape[0] != rows or x.shape[-1] != dim:
    want = "[b, D]" if ndim == 2 else "[b, K, D]"
    raise ValueError(f"contrastive_loss: {name} has shape {tuple(x.shape)}, expected {want} with "
                     f"b={rows}, D={dim}")


def _check_inputs(name, tau_plus, text_emb, image_emb, neg_text_emb, neg_image_emb) -> tuple[int, int]:
  """(b, D) of the local rows; a ValueError naming the argument for anything else."""
  if name == "sigmoid":
    raise ValueError("contrastive_loss: the sigmoid loss is `sigmoid_loss` (`sharded_sigmoid_loss`)")
  if name not in CONTRASTIVE_NAMES:
    raise ValueError(f"contrastive_loss: unknown loss name {name!r}; expected one of {LOSS_NAMES}")
  if name == "hardness" and not 0.0 <= tau_plus < 1.0:
    raise ValueError(f"contrastive_loss: tau_plus must be in [0, 1), got {tau_plus}")
  if text_emb.ndim != 2:
    raise ValueError(f"contrastive_loss: text_emb has shape {tuple(text_emb.shape)}, expected [b, D]")
  b, dim = text_emb.shape
  _check("image_emb", image_emb, 2, b, dim)
  _check("neg_text_emb", neg_text_emb, 3, b, dim)
  _check("neg_image_emb", neg_image_emb, 3, b, dim)
  return b, dim


def _similarity_stats(t, v, nt, nv, inv, image_sum, global_rows: int, mean) -> dict[str, Array]:
  """Mean positive, in-batch negative and own-composed-negative cosines (no gradient).

  They need no [b x pool] matrix: a text's summed similarity to every in-batch image is its dot product
  with `image_sum`, the sum of the (normalised) images of the global batch.
  """
  sg = lax.stop_gradient
  t_inv, v_inv, nt_inv, nv_inv = inv
  t_sg, v_sg, t_inv_sg, v_inv_sg = sg(t), sg(v), sg(t_inv), sg(v_inv)
  pos_sim = mean(jnp.sum(t_sg * v_sg, axis=1) * t_inv_sg * v_inv_sg)
  image_sum = sg(image_sum)
  row_sums = jnp.dot(t_sg, image_sum, precision=lax.Precision.HIGHEST) * t_inv_sg
  stats = {"pos_sim": pos_sim, "neg_sim": (mean(row_sums) - pos_sim) / max(global_rows - 1, 1)}
  hard = []
  if nv is not None:
    hard.append(mean(jnp.einsum("bd,bkd->bk", t_sg, sg(nv)) * t_inv_sg[:, None] * sg(nv_inv)))
  if nt is not None:
    hard.append(mean(jnp.einsum("bd,bkd->bk", v_sg, sg(nt)) * v_inv_sg[:, None] * sg(nt_inv)))
  if hard:
    stats["hard_neg_sim"] = sum(hard) / len(hard)
  return stats


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
  b, dim = _check_inputs(name, tau_plus, text_emb, image_emb, neg_text_emb, neg_image_emb)

  def gather(x):  # differentiable: its transpose sums every device's cotangent back to the owner
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)

  def mean(x):
    x = jnp.mean(x)
    return x if axis_name is None else lax.pmean(x, axis_name)

  # Raw rows and their inverse norms: the loss scales each chunk's dot products instead of normalising
  # (see _score_rows), and the pool stays in parts instead of being concatenated.
  f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
  t, v, nt, nv = f32(text_emb), f32(image_emb), f32(neg_text_emb), f32(neg_image_emb)
  t_inv, v_inv = inverse_norm(t), inverse_norm(v)
  nt_inv = None if nt is None else inverse_norm(nt)
  nv_inv = None if nv is None else inverse_norm(nv)
  t_all, v_all = gather(t), gather(v)
  v_all_inv = gather(v_inv)
  image_pool, text_pool = [(v_all, v_all_inv)], [(t_all, gather(t_inv))]
  if nv is not None:
    image_pool.append((gather(nv).reshape(-1, dim), gather(nv_inv).reshape(-1)))
  if nt is not None:
    text_pool.append((gather(nt).reshape(-1, dim), gather(nt_inv).reshape(-1)))
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * b
  labels = offset + jnp.arange(b)

  options = {"beta": beta, "tau_plus": tau_plus, "margin": margin}
  (t2i_rows, t2i_correct), (i2t_rows, i2t_correct) = _score_rows(
      (t, t_inv), (v, v_inv), (image_pool, text_pool), (temperature_t2i, temperature_i2t), labels, name,
      options, chunk_size)
  t2i_loss, i2t_loss = mean(t2i_rows), mean(i2t_rows)
  loss = t2i_loss + i2t_loss
  metrics = {"loss": loss, "t2i_loss": t2i_loss, "i2t_loss": i2t_loss,
             "t2i_accuracy": mean(t2i_correct), "i2t_accuracy": mean(i2t_correct)}
  image_sum = jnp.sum(lax.stop_gradient(v_all) * lax.stop_gradient(v_all_inv)[:, None], axis=0)
  metrics.update(_similarity_stats(t, v, nt, nv, (t_inv, v_inv, nt_inv, nv_inv), image_sum, t_all.shape[0],
                                   mean))
  return loss, metrics


def _batch_sharded_embeddings(what: str, mesh: Mesh, text_emb, image_emb, neg_text_emb, neg_image_emb) -> dict:
  """The embeddings a sharded loss reads, by name (absent negatives left out), each checked to split evenly
  over the mesh's batch shards."""
  embs = {"text": text_emb, "image": image_emb}
  if neg_text_emb is not None:
    embs["neg_text"] = neg_text_emb
  if neg_image_emb is not None:
    embs["neg_image"] = neg_image_emb
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  for key, x in embs.items():
    if x.shape[0] % shards:
      raise ValueError(f"{what}: {key} embeddings have {x.shape[0]} rows, not divisible by the {shards} batch "
                       f"shards of mesh {dict(mesh.shape)}")
  return embs


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
    embs = _batch_sharded_embeddings("sharded_contrastive_loss", mesh, text_emb, image_emb, neg_text_emb,
                                     neg_image_emb)

    def local(e, tt):
      return contrastive_loss(e["text"], e["image"], e.get("neg_text"), e.get("neg_image"),
                              temperature_t2i=tt[0], temperature_i2t=tt[1], axis_name=BATCH_AXES,
                              **loss_kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=({k: batch for k in embs}, (P(), P())),
                         out_specs=P(), check_vma=True)(embs, temps)

  return fn


def sharded_text_text_loss(mesh: Mesh, chunk_size: int = 0) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """MURAL's text-text task (docs/method.md §4.9): `fn(a_emb, b_emb, temperature)` -> (loss, metrics), a
  symmetric in-batch InfoNCE over caption-translation pairs (row r of `a_emb` and `b_emb`, [Bt, D]
  batch-sharded), every side gathered over the devices as the image-text loss is: `contrastive_loss`
  with captions in place of images. Metrics are prefixed `tt_` (`tt_loss`, `tt_a2b_accuracy`, ...)."""
  contrastive = sharded_contrastive_loss(mesh, name="infonce", chunk_size=chunk_size)
  names = {"loss": "tt_loss", "t2i_loss": "tt_a2b_loss", "i2t_loss": "tt_b2a_loss",
           "t2i_accuracy": "tt_a2b_accuracy", "i2t_accuracy": "tt_b2a_accuracy", "pos_sim": "tt_pos_sim",
           "neg_sim": "tt_neg_sim"}

  def fn(a_emb, b_emb, temperature):
    loss, metrics = contrastive(a_emb, b_emb, None, None, temperature)
    return loss, {names[k]: v for k, v in metrics.items() if k in names}

  return fn


# ------------------------------------------------------------------------------------------------------
# The sigmoid loss (SigLIP), with rotating caption blocks.


def _dot(a: Array, b: Array) -> Array:
  return jnp.einsum("nd,pd->np", a, b, precision=lax.Precision.HIGHEST)


def _sigmoid_block(t, nt, v, nv, scale, bias, diagonal: bool):
  """One caption block against the local images: (summed pair losses, logits of the in-batch pairs).

  `t` [n, D] captions and `nt` [n K, D] composed captions (or None) of the block, `v` [b, D] images and
  `nv` [b K, D] composed images (or None) of this device, all L2-normalised. Pairs: every caption with
  every image (positive on the diagonal when `diagonal`, the block's own rows), every caption with every
  composed image and every composed caption with every image (negatives). -log sigmoid(z x) is
  softplus(-z x).
  """
  x = scale * _dot(t, v) + bias
  if diagonal:
    z = jnp.where(jnp.eye(x.shape[0], x.shape[1], dtype=bool), -1.0, 1.0)
    total = jnp.sum(jax.nn.softplus(z * x))
  else:
    total = jnp.sum(jax.nn.softplus(x))
  extra = []
  if nv is not None:
    extra.append(scale * _dot(t, nv) + bias)      # [n, b K]: the block's captions vs composed images
  if nt is not None:
    extra.append(scale * _dot(nt, v) + bias)      # [n K, b]: the block's composed captions vs images
  for e in extra:
    total = total + jnp.sum(jax.nn.softplus(e))
  return total, x, extra


def _block_maxima(x, extra, nv, nt, diagonal: bool):
  """Per caption row the largest image logit, per image column the largest caption logit (positives
  excluded), composed columns / rows included: what the accuracies compare each positive against."""
  if diagonal:
    x = jnp.where(jnp.eye(x.shape[0], x.shape[1], dtype=bool), -jnp.inf, x)
  row_max, col_max = jnp.max(x, axis=1), jnp.max(x, axis=0)
  parts = list(extra)
  if nv is not None:
    row_max = jnp.maximum(row_max, jnp.max(parts.pop(0), axis=1))
  if nt is not None:
    col_max = jnp.maximum(col_max, jnp.max(parts.pop(0), axis=0))
  return row_max, col_max


def _rotate(tree, axis_name, shards: int):
  """Every device's blocks to the next device along the batch axes (device d -> d + 1)."""
  perm = [(i, (i + 1) % shards) for i in range(shards)]
  return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sigmoid_ring(axis_name, shards, t, nt, v, nv, scale, bias):
  """(this device's summed pair losses, (t2i correct, i2t correct, sum of positive logits)).

  Step 0 scores the device's own captions against its images (the diagonal holds the positives); then
  `shards - 1` times the caption blocks move one device on and are scored against the local images, so
  over the ring every caption meets every image of the global batch once. Only the local rows and one
  visiting block are ever held.
  """
  out, _ = _sigmoid_ring_fwd(axis_name, shards, t, nt, v, nv, scale, bias)
  return out


def _sigmoid_ring_fwd(axis_name, shards, t, nt, v, nv, scale, bias):
  sg = lax.stop_gradient
  total, x, extra = _sigmoid_block(t, nt, v, nv, scale, bias, diagonal=True)
  pos = jnp.diagonal(x)
  row_max, col_max = _block_maxima(sg(x), [sg(e) for e in extra], nv, nt, diagonal=True)
  # The visiting block carries its captions, their positives and their running maxima.
  carry = (t, nt, sg(pos), row_max, total, col_max)

  def visit(_, carry):
    t_b, nt_b, pos_b, row_max_b, total, col_max = carry
    t_b, nt_b, pos_b, row_max_b = _rotate((t_b, nt_b, pos_b, row_max_b), axis_name, shards)
    block_total, x, extra = _sigmoid_block(t_b, nt_b, v, nv, scale, bias, diagonal=False)
    r, c = _block_maxima(sg(x), [sg(e) for e in extra], nv, nt_b, diagonal=False)
    return t_b, nt_b, pos_b, jnp.maximum(row_max_b, r), total + block_total, jnp.maximum(col_max, c)

  if shards > 1:
    carry = lax.fori_loop(1, shards, visit, carry)
  _, _, pos_b, row_max_b, total, col_max = carry
  # Accuracy: the positive strictly above every other column of its query (ties count as wrong).
  t2i = jnp.sum((pos_b > row_max_b).astype(jnp.float32))  # the visiting block's captions, wherever they are
  i2t = jnp.sum((sg(pos) > col_max).astype(jnp.float32))  # this device's images
  out = (total, (t2i, i2t, jnp.sum(sg(pos))))
  return out, (t, nt, v, nv, scale, bias)


def _sigmoid_ring_bwd(axis_name, shards, res, cotangents):
  """Rotates the caption blocks again, recomputing each block's logits; each block's gradient travels with
  it and one last rotation brings it home. The images' gradients accumulate where the images live."""
  t, nt, v, nv, scale, bias = res
  g = cotangents[0]  # the metrics have no gradient

  def contributions(t_b, nt_b, diagonal):
    def block_total(t_b, nt_b, v, nv, scale, bias):
      return _sigmoid_block(t_b, nt_b, v, nv, scale, bias, diagonal)[0]
    _, vjp = jax.vjp(block_total, t_b, nt_b, v, nv, scale, bias)
    return vjp(g)

  def add(a, b):
    return jax.tree.map(jnp.add, a, b)

  d_t, d_nt, d_v, d_nv, d_scale, d_bias = contributions(t, nt, True)
  blocks, block_grads, local_grads = (t, nt), (d_t, d_nt), (d_v, d_nv, d_scale, d_bias)

  def visit(_, carry):
    blocks, block_grads, local_grads = carry
    blocks, block_grads = _rotate((blocks, block_grads), axis_name, shards)
    d_tb, d_ntb, *local = contributions(*blocks, False)
    return blocks, add(block_grads, (d_tb, d_ntb)), add(local_grads, tuple(local))

  if shards > 1:
    blocks, block_grads, local_grads = lax.fori_loop(1, shards, visit, (blocks, block_grads, local_grads))
    block_grads = _rotate(block_grads, axis_name, shards)  # each block's gradient back to its owner
  d_v, d_nv, d_scale, d_bias = local_grads
  return (*block_grads, d_v, d_nv, d_scale, d_bias)


_sigmoid_ring.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


def sigmoid_loss(text_emb: Array, image_emb: Array, neg_text_emb: Array | None = None,
                 neg_image_emb: Array | None = None, *, temperature: float | Array = 0.1,
                 bias: float | Array = SIGMOID_BIAS_INIT, axis_name: AxisName = None
                 ) -> tuple[Array, dict[str, Array]]:
  """The sigmoid loss (SigLIP) of local rows (inside shard_map, rows split over `axis_name`) or of a whole
  batch (`axis_name=None`).

  With cosines s and logits x = s / temperature + bias (both scalars, possibly traced and learnable):
  L = (1 / G) [sum over captions i, images j of softplus(-z_ij x_ij)  (z = +1 if i == j else -1)
             + sum over captions i, composed images (j, k) of softplus(x)
             + sum over composed captions (j, k), images i of softplus(x)],
  G the global batch size. Composed negatives are never paired with each other. The caption blocks rotate
  around the devices (`lax.ppermute`), so no device holds the gathered pool; the gradient is exact.

  Returns (loss, metrics): `loss`, `t2i_accuracy` / `i2t_accuracy` (the positive strictly above every other
  column of its query), `pos_logit` (mean positive logit), `pos_sim`, `neg_sim`, and with negatives
  `hard_neg_sim`, as for `contrastive_loss`.
  """
  b, dim = _check_inputs("infonce", 0.0, text_emb, image_emb, neg_text_emb, neg_image_emb)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
  t, v, nt, nv = f32(text_emb), f32(image_emb), f32(neg_text_emb), f32(neg_image_emb)
  t_inv, v_inv = inverse_norm(t), inverse_norm(v)
  nt_inv = None if nt is None else inverse_norm(nt)
  nv_inv = None if nv is None else inverse_norm(nv)
  t_n, v_n = t * t_inv[:, None], v * v_inv[:, None]
  nt_n = None if nt is None else (nt * nt_inv[..., None]).reshape(-1, dim)
  nv_n = None if nv is None else (nv * nv_inv[..., None]).reshape(-1, dim)
  scale = 1.0 / jnp.asarray(temperature, jnp.float32)
  bias = jnp.asarray(bias, jnp.float32)
  if axis_name is None:
    shards, psum = 1, (lambda x: x)
  else:
    shards = lax.axis_size(axis_name)
    psum = functools.partial(lax.psum, axis_name=axis_name)
    # The temperature and bias are the same on every device; each device's terms give them a gradient,
    # which the transpose of this cast sums.
    scale = lax.pcast(scale, axis_name, to="varying")
    bias = lax.pcast(bias, axis_name, to="varying")
  total, (t2i, i2t, pos_sum) = _sigmoid_ring(axis_name, shards, t_n, nt_n, v_n, nv_n, scale, bias)
  rows = b * shards
  loss = psum(total) / rows
  metrics = {"loss": loss, "t2i_accuracy": psum(t2i) / rows, "i2t_accuracy": psum(i2t) / rows,
             "pos_logit": psum(pos_sum) / rows}

  def mean(x):
    return psum(jnp.sum(x)) / x.size / shards

  image_sum = psum(jnp.sum(lax.stop_gradient(v_n), axis=0))
  metrics.update(_similarity_stats(t, v, nt, nv, (t_inv, v_inv, nt_inv, nv_inv), image_sum, rows, mean))
  return loss, metrics


def sharded_sigmoid_loss(mesh: Mesh) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`sigmoid_loss` over globally batch-sharded arrays, for use inside a jitted train step:
  `fn(text_emb, image_emb, neg_text_emb, neg_image_emb, temperature, bias) -> (loss, metrics)`, the
  negatives possibly None, the result replicated, `jax.grad` through it the full-batch gradient."""
  batch = P(BATCH_AXES)

  def fn(text_emb, image_emb, neg_text_emb, neg_image_emb, temperature, bias):
    embs = _batch_sharded_embeddings("sharded_sigmoid_loss", mesh, text_emb, image_emb, neg_text_emb,
                                     neg_image_emb)
    scalars = (jnp.asarray(temperature, jnp.float32), jnp.asarray(bias, jnp.float32))

    def local(e, sc):
      return sigmoid_loss(e["text"], e["image"], e.get("neg_text"), e.get("neg_image"), temperature=sc[0],
                          bias=sc[1], axis_name=BATCH_AXES)

    return jax.shard_map(local, mesh=mesh, in_specs=({k: batch for k in embs}, (P(), P())), out_specs=P(),
                         check_vma=True)(embs, scalars)

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


def balanced_match_loss(logits: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
  """Class-balanced image-text matching: the positives' mean CE and the negatives' mean CE, averaged.

  With one positive per K negatives a plain mean lets the head win by saying "no match" everywhere; here
  each class weighs one half whatever the counts (an empty class contributes 0).
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  ce = jax.nn.logsumexp(logits, axis=-1) - _take(logits, labels)
  n_pos = jnp.sum(labels)
  w = jnp.where(labels == 1, 0.5 / jnp.maximum(n_pos, 1), 0.5 / jnp.maximum(labels.shape[0] - n_pos, 1))
  loss = jnp.sum(w * ce)
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


# ------------------------------------------------------------------------------------------------------
# Late interaction (docs/method.md §7.5): an optional term beside the decomposition loss.


def late_interaction_loss(word_states: Array, word_mask: Array, token_states: Array, token_mask: Array, *,
                          margin: float = 0.2, normalize: bool = True,
                          axis_name: AxisName = None) -> tuple[Array, dict[str, Array]]:
  """Max-violation hinge (VSE++, as TERAN trains) on TERAN's MrSw score over the gathered batch.

  word_states [b, W, H] / word_mask [b, W]: each local caption's word states and real words; token_states
  [b, T, H] / token_mask [b, T]: each local image's tags + regions (`late_interaction.content_mask`). Row r
  of both is a positive pair. Every local caption is scored against every image of the global batch and
  every local image against every global caption (`lax.all_gather`, differentiable as in
  `contrastive_loss`, so the sharded loss and gradient are the single-device ones); per query
  relu(margin - S(pos) + max over negatives S), mean over queries per direction, summed. `normalize`: the
  length-normalised score (in [-1, 1], so `margin` means what it means for cosines). Composed negatives
  are not scored here. Memory: b x G x W x T similarities per device."""
  def gather(x):
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)

  def mean(x):
    x = jnp.mean(x)
    return x if axis_name is None else lax.pmean(x, axis_name)

  b = word_states.shape[0]
  t2i = late_interaction.mrsw_scores(word_states, word_mask, gather(token_states), gather(token_mask),
                                     normalize=normalize)  # [b, G]: local captions vs all images
  i2t = late_interaction.mrsw_scores(gather(word_states), gather(word_mask), token_states, token_mask,
                                     normalize=normalize).T  # [b, G]: local images vs all captions
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * b
  labels = offset + jnp.arange(b)

  def hinge(s):
    pos = jnp.take_along_axis(s, labels[:, None], axis=1)[:, 0]
    neg = jnp.max(jnp.where(jnp.arange(s.shape[1])[None, :] == labels[:, None], -jnp.inf, s), axis=1)
    return jax.nn.relu(margin - pos + neg), pos

  t2i_rows, pos = hinge(t2i)
  i2t_rows, _ = hinge(i2t)
  loss = mean(t2i_rows) + mean(i2t_rows)
  return loss, {"late_loss": loss, "late_pos_score": mean(lax.stop_gradient(pos))}


def sharded_late_interaction_loss(mesh: Mesh, **loss_kwargs) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`late_interaction_loss` over globally batch-sharded arrays (split over `BATCH_AXES`), for the jitted
  train step: `fn(word_states, word_mask, token_states, token_mask) -> (loss, metrics)`, replicated."""
  batch = P(BATCH_AXES)

  def fn(word_states, word_mask, token_states, token_mask):
    def local(w, wm, t, tm):
      return late_interaction_loss(w, wm, t, tm, axis_name=BATCH_AXES, **loss_kwargs)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch,) * 4, out_specs=P(), check_vma=True)(
        word_states, word_mask, token_states, token_mask)

  return fn
