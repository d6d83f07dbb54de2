"""Binary codes of B bits for a gallery: a code head, packing, Hamming top-k by XOR-popcount, float re-score.

Why its own module: `search.py`'s `binary` kind is the sign of each of the D float dimensions, a fixed code
of D bits with no learning behind it. Here a code of any length B comes from a *code head* (a linear map
D -> B and a sign, docs/method.md §7.6), either the data-independent baseline (`sign_baseline_head`: the
D sign bits themselves when B == D, else SimHash, the signs of B random Gaussian projections) or one
distilled from the decomposed model's similarities (`training/code_distillation.py`). Search is the
resource-limited path: Hamming distances by XOR and popcount over packed words (no float work at all),
a shortlist of S rows, then the float embeddings re-score only those S rows (`search.rescore`).

Bit layout: bit j of a row is `logits[:, j] >= 0`, packed 8 per byte, MSB first (`np.packbits`, the same
as `search.pack_signs`). Hamming search views each row's bytes as 32-bit words when B % 32 == 0; a
popcount of an XOR does not depend on how bits are grouped into words, so the distance is the same.

A head is saved as one small `.npz` file (`save_code_head`) that records the fingerprint of the export
whose embeddings it was distilled from; `load_code_head(path, export_fingerprint=...)` refuses a head of
another export (`CodeHeadMismatchError`): its bits would be meaningless on that model's embeddings.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import search

FORMAT = "vldeformer_jax.code_head"
VERSION = 1
MODALITIES = ("image", "text")


class CodeHeadMismatchError(ValueError):
  """A code head used with embeddings of an export other than the one it was distilled from."""


# ------------------------------------------------------------------------------------------------------
# Packing.


def pack_bits(bits: np.ndarray) -> np.ndarray:
  """bool [N, B] -> uint8 [N, ceil(B / 8)], MSB first (np.packbits); the tail of the last byte is 0."""
  return np.packbits(np.asarray(bits, bool), axis=1)


def unpack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """uint8 [N, ceil(B / 8)] -> bool [N, B] (inverse of pack_bits)."""
  return np.unpackbits(np.asarray(codes, np.uint8), axis=1, count=bits).astype(bool)


def code_bytes(bits: int) -> int:
  """Bytes per packed code of `bits` bits."""
  return -(-int(bits) // 8)


def _words(codes: np.ndarray) -> np.ndarray:
  """Packed uint8 rows as uint32 words when the row length allows (4x fewer XORs), else uint8 as is."""
  codes = np.ascontiguousarray(codes, np.uint8)
  return codes.view(np.uint32) if codes.shape[1] % 4 == 0 else codes


# ------------------------------------------------------------------------------------------------------
# The code head.


@dataclasses.dataclass(frozen=True)
class CodeHead:
  """bits(x, modality) = x @ w[modality] + b[modality] >= 0.

  `params`: `w_image`, `w_text` [D, B] (the same array when `shared`) and `b_image`, `b_text` [B]. A
  shared projection with a bias per modality is the default of the distillation (see
  training/code_distillation.py for why); separate projections are the other choice.
  """
  params: dict
  shared: bool = True
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def dim(self) -> int:
    return int(self.params["w_image"].shape[0])

  @property
  def bits(self) -> int:
    return int(self.params["w_image"].shape[1])

  @property
  def bytes_per_code(self) -> int:
    return code_bytes(self.bits)

  def logits(self, x: np.ndarray, modality: str) -> np.ndarray:
    """float32 [N, B]: the pre-sign projections of the embeddings x [N, D]."""
    if modality not in MODALITIES:
      raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"code head of a {self.dim}-d embedding got embeddings of shape {x.shape}")
    return x @ np.asarray(self.params[f"w_{modality}"], np.float32) + np.asarray(self.params[f"b_{modality}"],
                                                                                 np.float32)

  def encode(self, x: np.ndarray, modality: str, batch: int = 65536) -> np.ndarray:
    """Packed codes uint8 [N, ceil(B / 8)] of embeddings x [N, D] (in row blocks: x may be a memmap)."""
    out = np.empty((len(x), self.bytes_per_code), np.uint8)
    for a in range(0, len(x), batch):
      out[a:a + batch] = pack_bits(self.logits(x[a:a + batch], modality) >= 0)
    return out


def sign_baseline_head(dim: int, bits: int, seed: int = 0) -> CodeHead:
  """The data-independent codes of the same length: the D sign bits themselves (`search.pack_signs`)
  when bits == dim, else SimHash (the signs of `bits` random Gaussian projections; Charikar 2002), whose
  Hamming distance estimates the angle between the vectors. Shared by both modalities, zero bias. The
  distilled head starts from this one (training/code_distillation.py), so a gain is the distillation's."""
  if bits == dim:
    w = np.eye(dim, dtype=np.float32)
  else:
    w = np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32) / np.sqrt(dim)
  zero = np.zeros((bits,), np.float32)
  return CodeHead({"w_image": w, "w_text": w, "b_image": zero, "b_text": zero.copy()}, shared=True,
                  meta={"kind": "sign" if bits == dim else "simhash", "seed": seed})


def save_code_head(path: str, head: CodeHead, export_fingerprint: str, **meta) -> None:
  """Writes the head as one .npz (parameters + a JSON `meta` naming the export's fingerprint), atomically."""
  header = {"format": FORMAT, "version": VERSION, "bits": head.bits, "dim": head.dim, "shared": head.shared,
            "export_fingerprint": export_fingerprint, **head.meta, **meta}
  arrays = {"w_image": head.params["w_image"], "b_image": head.params["b_image"],
            "b_text": head.params["b_text"]}
  if not head.shared:
    arrays["w_text"] = head.params["w_text"]
  buf = io.BytesIO()
  np.savez(buf, meta=np.frombuffer(json.dumps(header, default=fileio.json_default).encode(), np.uint8),
           **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = fileio._tmp_sibling(path)  # noqa: SLF001 - the same temporary-sibling rule as every atomic write
  try:
    with open(tmp, "wb") as f:
      f.write(buf.getvalue())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_code_head(path: str, export_fingerprint: str | None = None) -> CodeHead:
  """Reads a head; with `export_fingerprint`, refuses one distilled from another export."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"code head file not found: {path}")
  try:
    with np.load(path) as z:
      meta = json.loads(bytes(z["meta"]).decode())
      arrays = {k: np.asarray(z[k], np.float32) for k in z.files if k != "meta"}
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path}: not a code head file ({e})") from e
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{path}: field 'format'/'version' is {meta.get('format')!r}/{meta.get('version')!r}, "
                     f"expected {FORMAT!r}/{VERSION}")
  if export_fingerprint is not None and meta.get("export_fingerprint") != export_fingerprint:
    raise CodeHeadMismatchError(
        f"{path}: code head was distilled from the export with fingerprint "
        f"{str(meta.get('export_fingerprint'))[:16]}..., but the embeddings come from the export with fingerprint "
        f"{export_fingerprint[:16]}...; distil a head for this export (launch/distill_codes.py --export=...)")
  shared = bool(meta.get("shared", True))
  params = {"w_image": arrays["w_image"], "b_image": arrays["b_image"], "b_text": arrays["b_text"],
            "w_text": arrays["w_image"] if shared else arrays["w_text"]}
  return CodeHead(params, shared=shared, meta=meta)


def load_code_head_for_export(path: str, export_dir: str) -> CodeHead:
  """`load_code_head` checked against the fingerprint in `export_dir`/export.json."""
  from vldeformer_jax.io import export as export_lib
  return load_code_head(path, export_lib.read_metadata(export_dir)["fingerprint"])


# ------------------------------------------------------------------------------------------------------
# Hamming search.


class HammingTopK(NamedTuple):
  distances: np.ndarray  # [Q, k] int32, ascending (bits + 1 where the gallery has fewer than k rows)
  indices: np.ndarray  # [Q, k] int64 gallery rows, ties by ascending row (-1 where none)


@jax.jit
def _hamming(q, g):
  """int32 [Q, N] Hamming distances of packed words q [Q, W] and g [N, W] by XOR and popcount."""
  return jnp.sum(jnp.bitwise_count(q[:, None, :] ^ g[None, :, :]).astype(jnp.int32), axis=-1)


def hamming_distances(query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
  """Full [Q, N] Hamming distance matrix of packed codes (small galleries and tests)."""
  return np.asarray(_hamming(jnp.asarray(_words(query_codes)), jnp.asarray(_words(gallery_codes))))


@functools.partial(jax.jit, static_argnames=("k", "chunk", "bits"))
def _hamming_scan(q, g, n_valid, *, k, chunk, bits):
  """Running top-k (smallest distance, then lowest row) of q against g [n_chunks * chunk, W].

  Distances are ranked as float32 (exact: integers up to 2^24): XLA's CPU top-k is a fast custom call
  for float32 but a full sort for int32 (measured: 70x slower for 1000 x 20K, k = 50). Each chunk uses
  search.py's exact two-stage top-k.
  """
  g = g.reshape((-1, chunk) + g.shape[1:])
  worst = jnp.float32(-(bits + 1))

  def step(carry, xs):
    vals, idx = carry
    c, i = xs
    rows = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
    neg = -_hamming(q, c).astype(jnp.float32)  # top_k of -distance: lower position first on ties
    neg = jnp.where(rows[None, :] < n_valid, neg, worst)
    top, pos = search._chunk_topk(neg, min(k, chunk))  # noqa: SLF001 - the same exact top-k as float search
    # The running list holds earlier rows only, so concatenating it first keeps ties by ascending row.
    allv = jnp.concatenate([vals, top], axis=1)
    alli = jnp.concatenate([idx, rows[pos]], axis=1)
    best, p = lax.top_k(allv, k)
    return (best, jnp.take_along_axis(alli, p, axis=1)), None

  init = (jnp.full((q.shape[0], k), worst, jnp.float32), jnp.full((q.shape[0], k), -1, jnp.int32))
  (vals, idx), _ = lax.scan(step, init, (g, jnp.arange(g.shape[0], dtype=jnp.int32)))
  return (-vals).astype(jnp.int32), idx


def hamming_topk(query_codes: np.ndarray, gallery_codes: np.ndarray, k: int, bits: int, *,
                 chunk: int = 4096, query_batch: int = 512) -> HammingTopK:
  """The k gallery rows nearest each query in Hamming distance, ties by ascending row.

  Packed codes (uint8 [Q | N, ceil(bits / 8)]); the gallery goes to the device once (1M codes of 256
  bits are 32 MB) and is scanned in chunks of `chunk` rows keeping a running top-k, so memory is
  [query_batch, chunk] distances whatever N is.
  """
  n = len(gallery_codes)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if query_codes.shape[1] != gallery_codes.shape[1]:
    raise ValueError(f"query codes have {query_codes.shape[1]} bytes, gallery codes {gallery_codes.shape[1]}")
  chunk = max(1, min(chunk, n))
  g = _words(gallery_codes)
  pad = -n % chunk
  g = jnp.asarray(np.concatenate([g, np.zeros((pad, g.shape[1]), g.dtype)]) if pad else g)
  qw = _words(query_codes)
  out_d = np.empty((len(qw), k), np.int32)
  out_i = np.empty((len(qw), k), np.int64)
  qb = max(1, min(query_batch, len(qw)))
  for a in range(0, len(qw), qb):
    q = qw[a:a + qb]
    m = len(q)
    if m < qb:
      q = np.concatenate([q, np.zeros((qb - m, q.shape[1]), q.dtype)])
    d, i = _hamming_scan(jnp.asarray(q), g, np.int32(n), k=k, chunk=chunk, bits=int(bits))
    out_d[a:a + m] = np.asarray(d)[:m]
    out_i[a:a + m] = np.asarray(i)[:m]
  out_i[out_d > bits] = -1
  return HammingTopK(out_d, out_i)


def shortlist_rescore(queries: np.ndarray, query_codes: np.ndarray, gallery: np.ndarray,
                      gallery_codes: np.ndarray, bits: int, shortlist: int, k: int, **kwargs):
  """Hamming top-`shortlist`, then the float embeddings re-score those rows: `search.TopK` of size k."""
  short = hamming_topk(query_codes, gallery_codes, min(shortlist, len(gallery)), bits, **kwargs).indices
  return search.rescore(queries, gallery, short, k)
