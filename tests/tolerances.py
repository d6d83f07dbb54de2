"""Tolerances of the tests, derived from floating-point rounding rather than tuned on one machine.

CPUs differ in the last bits of float32 results (AMD EPYC; Intel Xeon with AVX-512 and AMX; another XLA
version blocks a dot product differently), so no comparison may rely on how one machine rounds. Every
comparison of computed numbers in tests/ follows one of the rules below, and says which in a comment.

EXACT: bitwise equality, where both sides run the identical sequence of floating-point operations on
  identical inputs: a resumed run against the uninterrupted one (same program, same devices), restored
  parameters against the saved ones, the same compiled function applied twice to the same input. Also
  exact: results that are exact in floating point (small integers and sums of them, counts / N
  percentages computed by the same formula, 0.0 and 1.0 that come out of a comparison). `assert_bitwise`.

F32: a float32 result `got` against a reference `ref` computed in float64 (numpy, `jax.enable_x64`, torch
  .double()) from the same float32 inputs:

      |got - ref| <= gamma(n) * scale,    gamma(n) = n u / (1 - n u),    u = 2^-24 (float32 round-off).

  Higham, Accuracy and Stability of Numerical Algorithms (2nd ed.), §3.1 and §3.5: a sum or dot product
  of length n has an error of at most gamma(n) times the sum of the magnitudes of its terms, and to first
  order the errors of a chain of steps add up, which adds their lengths. So
  - n: the length of the longest chain of dependent roundings, i.e. the sum of the lengths of the
    reductions along it (a dot product, sum or mean of k terms counts k) plus 1 per elementwise operation
    and `ELEMENTARY` per exp / log / tanh / erf / rsqrt / cos (taken as accurate to within 4 ulp = 8 u;
    XLA's measured at most 5.2 u, for erf); `transformer_depth` counts a BERT forward pass this way;
  - scale: the magnitude the terms reach, stated by each test: 1 for a cosine of unit vectors or a tanh;
    1/T for logits cos/T; a tensor's largest reference magnitude `max_abs(ref)` where the result is well
    conditioned; and that times L for a result computed through a softmax of logits up to L in magnitude
    (a cross-entropy gradient): an absolute logit error e changes each softmax weight by a factor
    exp(+-e) ~ 1 +- e, so the logits' errors (L times their relative error) reach the result relative to
    its magnitude. Where the magnitude of intermediate values is not known from the inputs (logits of
    a random model), it is bounded from the parameters (tests/model_helpers.py `logit_bounds`).
  The float64 reference's own error (u = 2^-53) is negligible against the bound. `assert_f32`.

F32-PAIR: two float32 evaluations of the same exact quantity that differ in order or grouping only (sharded
  against unsharded, chunked against whole, a row alone against the row in a larger batch, another
  compiled program): each is within the F32 bound of the exact value, so |a - b| <= 2 gamma(n) scale. Used
  where no float64 reference of the computation exists (the Flax model computes in float32 by design).
  `assert_f32(..., pair=True)`.

F64: rule F32 with u = 2^-53 for values computed in float64 (numpy arrays, Python floats): recall
  percentages, timing sums, float64 references recomputed by a second formula. `approx64`, `assert_f64`.

BF16: bfloat16 compute against float32: dot products accumulate in float32 and each intermediate stored
  in bfloat16 is one rounding (u = 2^-8), so a chain of m stored intermediates moves a result by at most
  gamma(m, 2^-8) times its magnitude (and a vector's cosine to the float32 one by at most delta^2 / 2).

A test that carries a bound through further steps (an AdamW update, a quantisation, a cosine of two
vectors with bounded errors) derives it from these rules in a comment and checks it with `assert_within`.

RANKS: discrete results computed from float32 scores (argmax accuracies, ranks, top-k indices, recall)
  are compared exactly only where the reference scores that decide them are further apart than twice
  the bound B on the scores' errors (`assert_gaps_exceed`), since otherwise one rounding could legally
  flip them on another CPU. Rank metrics (R@K, medr, mAP@R, rsum) are held to the interval between their
  values at the least and the most favourable ranks that scores within B of the reference allow
  (`assert_rank_metrics_within`): one value, i.e. exact equality, wherever the ranks are decided.

Each bound must still catch a real bug: a wrong gradient, a missing loss term, a wrong normalisation or
mask moves results by O(1) relative, and a port error such as a wrong LayerNorm epsilon or the tanh
approximation of GELU by ~3e-4 to 1e-3 (measured on the parity model). The worst-case bounds here are far
above the errors one machine shows (typically 10^2 to 10^4 times), but for the tiny models most tests use
(gamma(~900) ~ 5e-5) they stay below those bug sizes; where a chain is so long that they do not (the
6-layer MiniLM parity, bfloat16), the test says what it still catches.
"""
from __future__ import annotations

import numpy as np
import pytest

U32 = 2.0 ** -24  # unit round-off of float32 (round to nearest)
U64 = 2.0 ** -53  # unit round-off of float64
U_BF16 = 2.0 ** -8  # unit round-off of bfloat16 (8 significant bits)
ELEMENTARY = 8    # roundings charged for one exp / log / tanh / erf / rsqrt / cos (within 4 ulp = 8 u)


def gamma(n: float, u: float = U32) -> float:
  """Higham's gamma_n = n u / (1 - n u): the relative error bound of a chain of n roundings."""
  if n * u >= 1:
    raise ValueError(f"gamma({n}): n u = {n * u} >= 1, no bound")
  return n * u / (1 - n * u)


def f32_bound(n: float, scale: float, *, pair: bool = False) -> float:
  """Rule F32 (and F32-PAIR with pair=True): the largest allowed |difference|."""
  return (2.0 if pair else 1.0) * gamma(n) * float(scale)


def max_abs(x) -> float:
  """The largest magnitude of an array (the `scale` of a well-conditioned tensor result)."""
  return float(np.max(np.abs(np.asarray(x, np.float64))))


def _check(got, ref, bound, rule: str, err_msg: str) -> None:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape or got.size == 1 or ref.size == 1, (got.shape, ref.shape, err_msg)
  bound = np.broadcast_to(np.asarray(bound, np.float64), np.broadcast_shapes(got.shape, ref.shape))
  err = np.abs(got - ref)
  bad = ~(err <= bound)  # NaN fails
  if bad.any():
    i = np.unravel_index(int(np.argmax(np.where(bad, err, -1.0))), err.shape) if err.ndim else ()
    raise AssertionError(
        f"{err_msg + ': ' if err_msg else ''}{rule}: {int(bad.sum())} of {err.size} entries exceed the bound; "
        f"worst at {i}: got {np.broadcast_to(got, err.shape)[i]!r}, reference "
        f"{np.broadcast_to(ref, err.shape)[i]!r}, |diff| {err[i]:.3e} > bound {bound[i]:.3e}")


def assert_f32(got, ref, *, n: float, scale, pair: bool = False, err_msg: str = "") -> None:
  """Rule F32: |got - ref| <= gamma(n) * scale elementwise (`scale` a number or an array that broadcasts).
  Rule F32-PAIR with `pair=True`: both sides float32, the bound doubles."""
  factor = 2.0 if pair else 1.0
  _check(got, ref, factor * gamma(n) * np.asarray(scale, np.float64), "rule F32-PAIR" if pair else "rule F32",
         err_msg)


def assert_within(got, ref, bound, *, rule: str, err_msg: str = "") -> None:
  """|got - ref| <= bound elementwise, for a bound a test derives from these rules itself (e.g. through
  an optimiser step); `rule` names it in the failure message."""
  _check(got, ref, bound, rule, err_msg)


def assert_f64(got, ref, *, n: float, scale, err_msg: str = "") -> None:
  """Rule F64: |got - ref| <= gamma(n, U64) * scale elementwise."""
  _check(got, ref, gamma(n, U64) * np.asarray(scale, np.float64), "rule F64", err_msg)


def approx64(ref, *, n: float, scale: float):
  """Rule F64 as a `pytest.approx` (numbers, sequences or dicts of numbers): abs = gamma(n, U64) * scale."""
  return pytest.approx(ref, rel=0, abs=gamma(n, U64) * scale)


def assert_bitwise(got, ref, err_msg: str = "") -> None:
  """Rule EXACT: same dtype, same shape, same bits (NaNs equal if in the same places)."""
  got, ref = np.asarray(got), np.asarray(ref)
  assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, got.shape, ref.dtype, ref.shape, err_msg)
  if not np.array_equal(got, ref, equal_nan=got.dtype.kind in "fc"):
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64)) if got.dtype.kind in "fciub" else None
    raise AssertionError(f"{err_msg + ': ' if err_msg else ''}rule EXACT: not bitwise equal"
                         + (f" (max |diff| {np.nanmax(diff):.3e})" if diff is not None and diff.size else ""))


def assert_gaps_exceed(scores, bound: float, *, axis: int = -1, what: str = "scores") -> None:
  """The top score of each row (along `axis`) beats the runner-up by more than `bound`: an argmax decided
  by these scores cannot change under errors below bound / 2 on each score."""
  s = np.sort(np.moveaxis(np.asarray(scores, np.float64), axis, -1), axis=-1)
  gap = float(np.min(s[..., -1] - s[..., -2]))
  assert gap > bound, f"{what}: smallest top-1 gap {gap:.3e} is within the rounding bound {bound:.3e}"


def transformer_depth(*, hidden: int, intermediate: int, layers: int, seq_len: int, heads: int,
                      pooling_len: int = 0) -> int:
  """n of rule F32 for one post-LN BERT forward pass (embeddings -> final hidden states), counted along
  the longest chain: the three-way embedding sum and its LayerNorm, then per layer the query/key dense
  (hidden), the head's score dot product (hidden / heads), the softmax over the keys (seq_len), the
  weighted sum of values (seq_len), the attention output dense (hidden), LayerNorm (2 hidden: mean and
  variance), the intermediate dense (hidden) and GELU, the output dense (intermediate), LayerNorm. Each
  LayerNorm renormalises, so every stage is well conditioned relative to the magnitudes at its output.
  `pooling_len`: add a mean over that many positions, a tanh and an L2 normalisation (`embed` + norm)."""
  layer_norm = 2 * hidden + ELEMENTARY + 4
  per_layer = ((hidden + 1) + (hidden // heads + 2) + (seq_len + ELEMENTARY + 2) + seq_len
               + (hidden + 2) + layer_norm + (hidden + 1 + ELEMENTARY + 3) + (intermediate + 2) + layer_norm)
  n = 3 + layer_norm + layers * per_layer
  if pooling_len:
    n += pooling_len + 1 + ELEMENTARY + (hidden + ELEMENTARY + 1)
  return n


def _rank_counts(scores, gt, bound):
  """For one query: per ground-truth item, the fewest and the most other items that can rank above it
  when every score moves by at most `bound` (ties are ranked by index: counted as possibly above)."""
  others = scores[~gt][None, :] - scores[gt][:, None]
  return (others > 2 * bound).sum(1), (others >= -2 * bound).sum(1)


def _rank_metrics(above) -> dict:
  """R@1/5/10, medr and mAP@R (percent, as retrieval/metrics.py) from each query's per-ground-truth counts
  of other items ranked above it. More items above never raises R@K or AP, never lowers medr."""
  first = np.array([a.min() for a in above])
  out = {f"R@{k}": 100.0 * np.mean(first < k) for k in (1, 5, 10)}
  out["medr"] = np.floor(np.median(first)) + 1
  ap = []
  for a in above:
    r = len(a)
    pos = np.sort(a) + np.arange(r)  # 0-based positions of the ground-truth items
    ap.append(np.sum((np.arange(r) + 1) / (pos + 1) * (pos < r)) / r)
  out["mAP@R"] = 100.0 * np.mean(ap)
  return out


def rank_metric_bounds(sim, txt2img, bound: float, sim_t2i=None) -> dict:
  """Rule RANKS: {"i2t" | "t2i": {metric: (low, high)}, "rsum": (low, high)} over every ranking that
  scores within `bound` of `sim` [N_img, N_txt] allow (`sim_t2i`: a separate matrix for t2i)."""
  sim = np.asarray(sim, np.float64)
  sim_t2i = sim if sim_t2i is None else np.asarray(sim_t2i, np.float64)
  txt2img = np.asarray(txt2img)
  out = {}
  queries = {"i2t": [_rank_counts(sim[i], txt2img == i, bound) for i in range(sim.shape[0])],
             "t2i": [_rank_counts(sim_t2i[:, j], np.arange(sim.shape[0]) == txt2img[j], bound)
                     for j in range(sim.shape[1])]}
  for d, rows in queries.items():
    best, worst = _rank_metrics([lo for lo, _ in rows]), _rank_metrics([hi for _, hi in rows])
    out[d] = {k: tuple(sorted((best[k], worst[k]))) for k in best}
  keys = [(d, f"R@{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)]
  out["rsum"] = (sum(out[d][k][0] for d, k in keys), sum(out[d][k][1] for d, k in keys))
  return out


def assert_rank_metrics_within(got: dict, sim, txt2img, bound: float, sim_t2i=None) -> None:
  """Rule RANKS for a metrics dict as retrieval/metrics.py returns it (R@K and medr per direction, mAP@R
  and rsum when present), with rule F64 slack for the percentages (the same means, another formula)."""
  ranges = rank_metric_bounds(sim, txt2img, bound, sim_t2i)
  slack = gamma(np.size(sim) + 10, U64) * 600
  checks = [((d, k), got[d][k], ranges[d][k]) for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10", "medr")]
  if "mAP@R" in got:
    checks += [(("mAP@R", d), got["mAP@R"][d], ranges[d]["mAP@R"]) for d in ("i2t", "t2i")]
  if "rsum" in got:
    checks.append((("rsum",), got["rsum"], ranges["rsum"]))
  for where, value, (lo, hi) in checks:
    assert lo - slack <= value <= hi + slack, f"rule RANKS: {where} = {value} outside [{lo}, {hi}]"
