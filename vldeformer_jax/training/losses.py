"""The gathered contrastive loss of the decomposition stage (`contrastive_loss`, `sharded_contrastive_loss`),
`LOSS_NAMES`, and the helpers the other gathered losses share (inverse norms, input checks, similarity
metrics, `_batch_sharded_embeddings`). The other objectives live beside it: the sigmoid loss in
training/sigmoid_loss.py, the stage-1 ITM / MLM cross-entropies in training/early_interaction_losses.py, the
late-interaction term in training/late_interaction_term.py, the text-text term in training/text_text_term.py.

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
- `sigmoid` (docs/method.md §4.7, SigLIP) is not one of them: it is `sigmoid.sigmoid_loss`, with caption
  blocks rotating around the devices instead of a gathered pool (training/sigmoid_loss.py).

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

Array = jax.Array
AxisName = str | Sequence[str] | None

CONTRASTIVE_NAMES = ("infonce", "hardness", "hinge")  # softmax-family objectives of `contrastive_loss`
LOSS_NAMES = CONTRASTIVE_NAMES + ("sigmoid",)          # `sigmoid`: `sigmoid.sigmoid_loss`


# ------------------------------------------------------------------------------------------------------
# Per-row objectives: (similarities of a chunk of queries vs the pool) -> per-row loss.
#
# The pool comes in parts (the in-batch columns, then the composed-negative columns), each scored on its
# own and combined by logaddexp / max: concatenating them would copy the whole [pool, D] pool (and its
# gradient) once more. The positive of each query is a column of the first part.


def inverse_norm(x: Array, eps: float = 1e-12) -> Array:
  """1 / max(||x||, eps) over the last axis, in float32: multiplying by it normalises x as
  torch.nn.functional.normalize does."""
  x = x.astype(jnp.float32)
  return lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


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
