"""A persistent embedding index: embed a gallery once, answer queries later without re-embedding it.

This is VLDeformer's "single modal indexing": images (or captions) are encoded offline by the decomposed
encoder and stored; a query is one encoder pass plus a search (retrieval/search.py: exact chunked top-k in
JAX, optionally compact int8 / 1-bit codes with the shortlist re-scored in float).

  INDEX/
    meta.json        {"format": "vldeformer_jax.index", "version": 1, "fingerprint": <export's>, "side",
                      "num", "dim", "compact", "dataset", "split", "data_dir", "files": {name: sha256}}
    embeddings.npy   float32 [N, D], L2-normalised (memory-mapped when searching)
    ids.npy          int64 [N]: the image_id of each row
    texts.json       what each row is: the tags (images) or the caption text (captions)
    codes.npy        int8 [N, D] (+ scales.npy float32 [N]) or uint8 [N, D/8]: only for a compact index
    entry_encoders.npy  int32 [N]: per entry, its encoder's position in meta["encoders"] (the fingerprints of
                     every export that encoded an entry); absent in older indexes (every entry: "fingerprint")

Continual indexing (`add_items`): items encoded by the encoder of every entry are appended; items encoded by
another encoder are refused unless the policy is `keep` (old entries stay as they were encoded; the index's
"fingerprint", the encoder queries must come from, becomes the new one) or `reindex` (every old entry is
re-encoded with the new encoder).

The directory is written under a temporary sibling and renamed, so an index that exists is complete. On
load every file is checked against the sha256 in meta.json and its shape against `num`/`dim` (a corrupt
or partly replaced index is refused), and `check_fingerprint` refuses an index built by another export:
embeddings of different weights live in a different space and would give silently wrong answers.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Sequence

import numpy as np
from tqdm import tqdm

from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import gallery as gallery_lib
from vldeformer_jax.retrieval import search
from vldeformer_jax.retrieval.search import TopK, exact_topk  # noqa: F401  (public: the exact search)

log = logging.getLogger(__name__)

FORMAT = "vldeformer_jax.index"
VERSION = 1
META = "meta.json"
SIDES = ("images", "captions")
COMPACT = (None, "int8", "binary")
ADD_POLICIES = (None, "keep", "reindex")
ENTRY_ENCODERS = "entry_encoders.npy"


class BadIndexError(ValueError):
  """A missing, corrupt, stale or foreign index (the message says which file and what to do)."""


class EncoderMismatchError(BadIndexError):
  """Items encoded by another encoder than the index's entries, added without a `keep` / `reindex` policy."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def write_index(path: str, embeddings: np.ndarray, ids: Sequence[int], texts: Sequence[str], *,
                fingerprint: str, side: str, compact: str | None = None, metadata: dict | None = None,
                overwrite: bool = False, entry_fingerprints: Sequence[str] | None = None) -> dict:
  """Writes an index directory atomically from embeddings already computed; returns its meta.json.

  `entry_fingerprints`: the encoder of each entry (default: `fingerprint` for all)."""
  if side not in SIDES:
    raise ValueError(f"index side must be one of {SIDES}, got {side!r}")
  if compact not in COMPACT:
    raise ValueError(f"compact must be one of {COMPACT}, got {compact!r}")
  emb = np.asarray(embeddings, np.float32)
  ids = np.asarray(ids, np.int64)
  if emb.ndim != 2 or len(ids) != len(emb) or len(texts) != len(emb):
    raise ValueError(f"index: embeddings {emb.shape}, {len(ids)} ids and {len(texts)} texts do not match")
  entry_fps = [fingerprint] * len(emb) if entry_fingerprints is None else [str(f) for f in entry_fingerprints]
  if len(entry_fps) != len(emb):
    raise ValueError(f"index: {len(entry_fps)} entry fingerprints for {len(emb)} embeddings")
  encoders = sorted(set(entry_fps) | {fingerprint})
  position = {f: i for i, f in enumerate(encoders)}
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"index already exists: {path} (pass overwrite=True / --overwrite to replace it)")
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    arrays = {"embeddings.npy": emb, "ids.npy": ids,
              ENTRY_ENCODERS: np.array([position[f] for f in entry_fps], np.int32).reshape(len(emb))}
    if compact == "int8":
      arrays["codes.npy"], arrays["scales.npy"] = search.quantize_int8(emb)
    elif compact == "binary":
      arrays["codes.npy"] = search.pack_signs(emb)
    for name, a in arrays.items():
      np.save(os.path.join(tmp, name), a)
    with open(os.path.join(tmp, "texts.json"), "w") as f:
      json.dump([str(t) for t in texts], f)
    files = {name: _sha256(os.path.join(tmp, name)) for name in sorted(list(arrays) + ["texts.json"])}
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "side": side,
            "num": int(len(emb)), "dim": int(emb.shape[1]), "compact": compact, "files": files,
            "encoders": encoders,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    meta.update({k: v for k, v in (metadata or {}).items() if k not in meta})
    fileio.write_json_atomic(os.path.join(tmp, META), meta)
    fileio.replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


@dataclasses.dataclass
class Index:
  """A loaded index. Arrays are memory-mapped: only searched chunks / re-scored rows are read."""
  path: str
  meta: dict
  embeddings: np.ndarray
  ids: np.ndarray
  texts: list[str]
  codes: np.ndarray | None = None
  scales: np.ndarray | None = None
  entry_encoders: np.ndarray | None = None  # int32 [N] into meta["encoders"]; None: all meta["fingerprint"]

  @classmethod
  def load(cls, path: str, *, verify: bool = True) -> "Index":
    """Reads and checks an index directory; `verify` re-hashes every file against meta.json."""
    path = os.path.abspath(path)
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
      raise BadIndexError(f"index not found: {path} (build it with `launch/index.py build`)")
    if not os.path.isfile(meta_path):
      raise BadIndexError(f"index {path}: missing {META}; not a complete vldeformer_jax index (rebuild it)")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except json.JSONDecodeError as e:
      raise BadIndexError(f"{meta_path}: not valid JSON (line {e.lineno}: {e.msg}); rebuild the index") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise BadIndexError(f"{meta_path}: field 'format' is not {FORMAT!r}; not a vldeformer_jax index")
    if meta.get("version") != VERSION:
      raise BadIndexError(f"{meta_path}: index version {meta.get('version')!r} is stale; this code reads "
                        f"version {VERSION}: rebuild the index")
    for key in ("fingerprint", "side", "num", "dim", "files"):
      if key not in meta:
        raise BadIndexError(f"{meta_path}: field {key!r} is missing; rebuild the index")
    for name, digest in meta["files"].items():
      f = os.path.join(path, name)
      if not os.path.isfile(f):
        raise BadIndexError(f"index {path}: file {name} listed in {META} is missing; rebuild the index")
      if verify and _sha256(f) != digest:
        raise BadIndexError(f"index {path}: {name} does not match its sha256 in {META} (corrupt or modified "
                          f"after the build); rebuild the index")
    n, d = meta["num"], meta["dim"]

    def arr(name, shape):
      try:
        a = np.load(os.path.join(path, name), mmap_mode="r")
      except (ValueError, OSError) as e:
        raise BadIndexError(f"index {path}: cannot read {name}: {e}; rebuild the index") from e
      if shape is not None and tuple(a.shape) != shape:
        raise BadIndexError(f"index {path}: {name} has shape {tuple(a.shape)}, {META} says {shape}; "
                          "rebuild the index")
      return a

    with open(os.path.join(path, "texts.json")) as f:
      texts = json.load(f)
    if len(texts) != n:
      raise BadIndexError(f"index {path}: texts.json has {len(texts)} entries, {META} says {n}")
    codes = scales = None
    if meta.get("compact") == "int8":
      codes, scales = arr("codes.npy", (n, d)), arr("scales.npy", (n,))
    elif meta.get("compact") == "binary":
      codes = arr("codes.npy", (n, -(-d // 8)))
    entry_encoders = None
    if ENTRY_ENCODERS in meta["files"]:
      entry_encoders = np.asarray(arr(ENTRY_ENCODERS, (n,)))
      if n and (entry_encoders.min() < 0 or entry_encoders.max() >= len(meta.get("encoders", []))):
        raise BadIndexError(f"index {path}: {ENTRY_ENCODERS} points outside meta.json's encoders; rebuild it")
    return cls(path, meta, arr("embeddings.npy", (n, d)), arr("ids.npy", (n,)), texts, codes, scales,
               entry_encoders)

  @property
  def fingerprint(self) -> str:
    return self.meta["fingerprint"]

  @property
  def entry_fingerprints(self) -> list[str]:
    """The fingerprint of the encoder of each entry."""
    if self.entry_encoders is None:
      return [self.fingerprint] * len(self.ids)
    encoders = self.meta["encoders"]
    return [encoders[int(i)] for i in self.entry_encoders]

  def check_fingerprint(self, fingerprint: str, export: str = "the encoder") -> None:
    """Refuses to answer queries embedded by weights other than those that built the index."""
    if fingerprint != self.fingerprint:
      raise BadIndexError(
          f"index {self.path} was built by the export with fingerprint {self.fingerprint[:16]}..., but "
          f"{export} has fingerprint {fingerprint[:16]}...: its embeddings are in another space. Query with "
          f"the export that built the index, or rebuild the index with this one.")

  def search(self, queries: np.ndarray, k: int = 10, *, rescore_factor: int = 10, mesh=None,
             chunk_size: int = search.DEFAULT_CHUNK, exact: bool | None = None) -> TopK:
    """Top-k rows for L2-normalised queries [Q, D]. A compact index scans its codes for a shortlist of
    k * rescore_factor rows, then re-scores those in float (`exact=True` scans the float rows instead)."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    kind = self.meta.get("compact")
    if kind is None or exact:
      return search.exact_topk(queries, self.embeddings, k, mesh=mesh, chunk_size=chunk_size)
    short = search.search_codes(queries, self.codes, min(self.meta["num"], k * rescore_factor), kind=kind,
                                scales=self.scales, dim=self.meta["dim"], mesh=mesh, chunk_size=chunk_size)
    return search.rescore(queries, self.embeddings, short.indices, k)


def add_items(path: str, embeddings: np.ndarray, ids: Sequence[int], texts: Sequence[str], *, fingerprint: str,
              policy: str | None = None, reencode=None) -> dict:
  """Appends items encoded by the encoder `fingerprint` to the index at `path` (rewritten atomically);
  returns the new meta.json.

  When an entry of the index was encoded by another encoder the add is refused (`EncoderMismatchError`)
  unless `policy` is `keep` (old entries stay as they were encoded, each with its own fingerprint) or
  `reindex` (`reencode(ids, texts) -> [N_old, D]` re-encodes every old entry with the new encoder).
  Either way the index's fingerprint (what queries must come from) becomes `fingerprint`.
  """
  if policy not in ADD_POLICIES:
    raise ValueError(f"add policy must be one of {ADD_POLICIES}, got {policy!r}")
  old = Index.load(path)
  emb = np.asarray(embeddings, np.float32)
  if emb.ndim != 2 or emb.shape[1] != old.meta["dim"]:
    raise ValueError(f"index {old.path}: new embeddings have shape {emb.shape}, the index dim is {old.meta['dim']}")
  old_fps = old.entry_fingerprints
  old_emb = np.asarray(old.embeddings, np.float32)
  foreign = sorted(set(old_fps) - {fingerprint})
  if foreign and policy is None:
    raise EncoderMismatchError(
        f"index {old.path} holds entries encoded by {', '.join(f[:12] + '...' for f in foreign)}; the new items "
        f"are encoded by {fingerprint[:12]}...: refused; add with policy 'keep' (old entries stay as encoded) "
        f"or 'reindex' (re-encode every entry with the new encoder)")
  if foreign and policy == "reindex":
    if reencode is None:
      raise ValueError("policy 'reindex' needs reencode(ids, texts) -> embeddings of the old entries")
    old_emb = np.asarray(reencode(np.asarray(old.ids), list(old.texts)), np.float32)
    if old_emb.shape != (len(old_fps), old.meta["dim"]):
      raise ValueError(f"reencode returned shape {old_emb.shape}, expected {(len(old_fps), old.meta['dim'])}")
    old_fps = [fingerprint] * len(old_fps)
  keep_meta = {k: v for k, v in old.meta.items()
               if k not in ("format", "version", "fingerprint", "side", "num", "dim", "compact", "files",
                            "created", "encoders", "policy")}
  if foreign:
    keep_meta["policy"] = policy
  return write_index(old.path, np.concatenate([old_emb, emb]), np.concatenate([np.asarray(old.ids), ids]),
                     list(old.texts) + [str(t) for t in texts], fingerprint=fingerprint, side=old.meta["side"],
                     compact=old.meta.get("compact"), metadata=keep_meta, overwrite=True,
                     entry_fingerprints=old_fps + [fingerprint] * len(emb))


# ------------------------------------------------------------------------------------------------------
# Building from a dataset, querying from text or an image id (the launch/index.py entries).


def build_index(encoder, source, path: str, *, side: str = "images", compact: str | None = None,
                batch_size: int | None = None, metadata: dict | None = None, overwrite: bool = False,
                chunk: int = 1024) -> dict:
  """Embeds a split's images (tags + regions) or captions once and writes the index; returns meta.json."""
  gallery = gallery_lib.load_gallery(source)
  if side == "images":
    embs, ids, texts = [], gallery.image_ids, []
    for a in tqdm(range(0, gallery.num_images, chunk), desc="index images"):
      pos = range(a, min(a + chunk, gallery.num_images))
      x = gallery.image_inputs(encoder, pos)
      embs.append(encoder.embed_image_inputs(x, batch_size=batch_size))
      texts.extend(gallery_lib.text_of(source[int(gallery.rows[p])]["tags"]) for p in pos)
  elif side == "captions":
    embs, ids, texts = [], gallery.image_ids[gallery.txt2img], gallery.captions
    for a in tqdm(range(0, len(texts), chunk * 5), desc="index captions"):
      x = gallery.text_inputs(encoder, range(a, min(a + chunk * 5, len(texts))))
      embs.append(encoder.embed_text_inputs(x, batch_size=batch_size))
  else:
    raise ValueError(f"index side must be one of {SIDES}, got {side!r}")
  emb = np.concatenate(embs) if embs else np.zeros((0, encoder.model_config.embed_dim), np.float32)
  return write_index(path, emb, ids, texts, fingerprint=encoder.fingerprint, side=side, compact=compact,
                     metadata=metadata, overwrite=overwrite)


# A text query whose wordpieces are more than this fraction [UNK] is answered with a warning: its embedding
# says little more than "unknown words" (emoji, scripts the vocabulary lacks).
UNK_WARN_FRACTION = 0.5


def text_query_warnings(tokenizer, text: str, max_text_len: int) -> list[str]:
  """What a text query loses before it is embedded: wordpieces outside the vocabulary ([UNK]) when they are
  most of it, and the wordpieces beyond the caption length (dropped). Raises ValueError on an empty text."""
  if not text or not text.strip():
    raise ValueError("the text query is empty (or only whitespace): there is nothing to search for")
  pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
  found = []
  if not pieces:
    raise ValueError(f"the text query {text[:40]!r} has no wordpieces the tokenizer keeps: there is nothing to "
                     "search for")
  unk = sum(1 for p in pieces if p == tokenizer.unk_token_id)
  if unk / len(pieces) > UNK_WARN_FRACTION:
    found.append(f"{unk} of the {len(pieces)} wordpieces of the text query ({100 * unk / len(pieces):.0f}%) are "
                    "[UNK], outside the model's vocabulary: the results say little about the text")
  keep = max_text_len - 2  # [CLS] text [SEP]
  if len(pieces) > keep:
    found.append(f"the text query has {len(pieces)} wordpieces; the model reads the first {keep} "
                    f"(max_text_len {max_text_len} with [CLS] and [SEP]): {len(pieces) - keep} dropped")
  return found


def query_index(index: Index, encoder, *, text: str | None = None, image_record: dict | None = None,
                k: int = 10, export: str = "the encoder", exact: bool | None = None, warn=None) -> list[dict]:
  """Answers one text or image query from a stored index; refuses a foreign index and an empty text. Rows
  of {"rank", "score", "image_id", "text"}. `warn(message)` receives what the text query loses (mostly
  [UNK], truncated; `text_query_warnings`); default: logged as warnings."""
  index.check_fingerprint(encoder.fingerprint, export)
  if (text is None) == (image_record is None):
    raise ValueError("query_index: give exactly one of text= or image_record=")
  if text is not None:
    for message in text_query_warnings(encoder.tokenizer, text, encoder.model_config.max_text_len):
      (warn or log.warning)(message)
    q = encoder.embed_texts([text])
  else:
    q = encoder.embed_images([np.asarray(image_record["features"], np.float32)],
                             [image_record["tags"].decode() if isinstance(image_record["tags"], bytes)
                              else str(image_record["tags"])])
  top = index.search(q, k, exact=exact)
  return [{"rank": r + 1, "score": float(s), "image_id": int(index.ids[i]), "text": index.texts[i]}
          for r, (s, i) in enumerate(zip(top.scores[0], top.indices[0])) if i >= 0]


def find_record(source, image_id: int) -> dict:
  """The record of an image id in a split (a linear scan of the ids)."""
  for r in range(len(source)):
    rec = source[r]
    if int(rec["image_id"]) == int(image_id):
      return rec
  raise KeyError(f"image_id {image_id} is not in the split")


def run_build(export: str, data_dir: str, dataset: str, split: str, path: str, *, side: str = "images",
              compact: str | None = None, batch_size: int = 64, overwrite: bool = False) -> dict:
  """`launch/index.py build`: loads the export and the split, builds the index; returns its meta."""
  from vldeformer_jax.data import prepare
  from vldeformer_jax.retrieval.encoder import Encoder
  if not (data_dir and dataset):
    raise ValueError("build needs --data_dir and --dataset")
  encoder = Encoder.load(export, batch_size=batch_size)
  source = prepare.load_split(data_dir, dataset, split)
  return build_index(encoder, source, path, side=side, compact=compact, batch_size=batch_size,
                     overwrite=overwrite, metadata={"export": os.path.abspath(export), "data_dir": data_dir,
                                                    "dataset": dataset, "split": split})


def run_query(path: str, export: str, *, text: str | None = None, image_id: int | None = None, k: int = 10,
              data_dir: str | None = None, dataset: str | None = None, split: str | None = None,
              exact: bool = False, warn=None) -> list[dict]:
  """`launch/index.py query`: checks the query and the index first (cheap), then loads the export and
  answers. `warn`: see `query_index`."""
  from vldeformer_jax.io import export as export_lib
  if (text is None) == (image_id is None):
    raise ValueError("give exactly one of --text (a caption to search images or captions with) and --image_id "
                     "(an image of --dataset/--split)")
  if text is not None and not text.strip():
    raise ValueError("--text is empty (or only whitespace): there is nothing to search for")
  if k < 1:
    raise ValueError(f"--k must be >= 1, got {k}")
  index = Index.load(path)
  # Refuse a foreign index before paying for the model: export.json holds the fingerprint.
  index.check_fingerprint(export_lib.read_metadata(export)["fingerprint"], f"export {export}")
  from vldeformer_jax.retrieval.encoder import Encoder
  encoder = Encoder.load(export)
  record = None
  if image_id is not None:
    from vldeformer_jax.data import prepare
    data_dir = data_dir or index.meta.get("data_dir")
    dataset = dataset or index.meta.get("dataset")
    if not (data_dir and dataset):
      raise ValueError("an --image_id query needs --data_dir and --dataset")
    record = find_record(prepare.load_split(data_dir, dataset, split or index.meta.get("split", "test")),
                         image_id)
  return query_index(index, encoder, text=text, image_record=record, k=k, export=f"export {export}",
                     exact=exact or None, warn=warn)
