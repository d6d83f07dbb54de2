"""Answering one text or image query from a stored index (retrieval/index.py): `query_index` and
`run_query` (`launch/index.py query`).

The query is embedded by the export that built the index (a foreign export is refused), searched with
`Index.search`, and optionally its top-K re-ranked (retrieval/index_rerank.py: stored token states, a
cross-encoder, or the decomposed score). A text query reports what it loses before it is embedded
(`text_query_warnings`: mostly [UNK] wordpieces, truncation); an empty one is refused.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from vldeformer_jax.retrieval.index import Index

log = logging.getLogger(__name__)


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
                k: int = 10, export: str = "the encoder", exact: bool | None = None, warn=None,
                nprobe: int | None = None, ef_search: int | None = None, rerank_top_k: int = 0,
                rerank_score: str = "cross", rerank_weight: float = 0.5, cross_encoder=None, source=None,
                batch_size: int | None = None) -> list[dict]:
  """Answers one text or image query from a stored index; refuses a foreign index and an empty text. Rows
  of {"rank", "score", "image_id", "text"}. `warn(message)` receives what the text query loses (mostly
  [UNK], truncated; `text_query_warnings`); default: logged as warnings.

  `rerank_top_k` > 0: the first stage's top `rerank_top_k` re-scored by `rerank_score` (retrieval/
  index_rerank.py; `cross_encoder`: the export scoring `cross` / `mixed`, `source`: the split the index was
  built from, for a text query's image regions); rows then also carry "rerank_score" (None past the
  shortlist) and "score" stays the first stage's cosine."""
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
  top = index.search(q, max(k, rerank_top_k), exact=exact, nprobe=nprobe, ef_search=ef_search)
  found = top.indices[0] >= 0
  rows, cosines = top.indices[0][found], top.scores[0][found]
  if not rerank_top_k:
    return [{"rank": r + 1, "score": float(s), "image_id": int(index.ids[i]), "text": index.texts[i]}
            for r, (s, i) in enumerate(zip(cosines[:k], rows[:k]))]
  from vldeformer_jax.retrieval import index_rerank  # pylint: disable=import-outside-toplevel
  cosine_of = dict(zip(rows.tolist(), cosines.tolist()))
  order, new = index_rerank.rerank_rows(index, encoder, rows, cosines, rerank_top_k, score=rerank_score,
                                        weight=rerank_weight, text=text, image_record=image_record,
                                        cross_encoder=cross_encoder, source=source, batch_size=batch_size)
  return [{"rank": r + 1, "score": float(cosine_of[int(i)]), "rerank_score": None if np.isnan(n) else float(n),
           "image_id": int(index.ids[i]), "text": index.texts[i]} for r, (i, n) in enumerate(zip(order[:k], new[:k]))]


def find_record(source, image_id: int) -> dict:
  """The record of an image id in a split (a linear scan of the ids)."""
  for r in range(len(source)):
    rec = source[r]
    if int(rec["image_id"]) == int(image_id):
      return rec
  raise KeyError(f"image_id {image_id} is not in the split")


def run_query(path: str, export: str, *, text: str | None = None, image_id: int | None = None, k: int = 10,
              data_dir: str | None = None, dataset: str | None = None, split: str | None = None,
              exact: bool = False, warn=None, nprobe: int | None = None,
              ef_search: int | None = None, rerank_top_k: int = 0, rerank_score: str = "cross",
              rerank_weight: float = 0.5, rerank_export: str | None = None,
              allow_untrained_head: bool = False) -> list[dict]:
  """`launch/index.py query`: checks the query and the index first (cheap), then loads the export and
  answers. `warn`: see `query_index`. `rerank_*`: see `query_index`; `rerank_export`: the cross-encoder
  for `cross` / `mixed` (default `export`), refused when its match head was never trained unless
  `allow_untrained_head`."""
  from vldeformer_jax.io import export as export_lib
  if (text is None) == (image_id is None):
    raise ValueError("give exactly one of --text (a caption to search images or captions with) and --image_id "
                     "(an image of --dataset/--split)")
  if text is not None and not text.strip():
    raise ValueError("--text is empty (or only whitespace): there is nothing to search for")
  if k < 1:
    raise ValueError(f"--k must be >= 1, got {k}")
  for name, value in (("--nprobe", nprobe), ("--ef_search", ef_search)):
    if value is not None and value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if rerank_top_k < 0:
    raise ValueError(f"--rerank_top_k must be >= 0, got {rerank_top_k}")
  from vldeformer_jax.retrieval import index_rerank
  if rerank_score not in index_rerank.RERANK_SCORES:
    raise ValueError(f"unknown --rerank_score {rerank_score!r}; expected one of {index_rerank.RERANK_SCORES}")
  index = Index.load(path)
  # Refuse a foreign index before paying for the model: export.json holds the fingerprint.
  index.check_fingerprint(export_lib.read_metadata(export)["fingerprint"], f"export {export}")
  cross_needed = rerank_top_k and rerank_score in ("cross", "mixed")
  if rerank_top_k and (text is not None) != (index.meta["side"] == "images") and rerank_score != "decomposed":
    raise ValueError(f"--rerank_score={rerank_score} scores a caption with an image: a --text query needs an "
                     f"images index, an --image_id query a captions index (index {index.path} holds "
                     f"{index.meta['side']})")
  if rerank_top_k and rerank_score.startswith("late") and index.tokens is None:
    index.token_rows([])  # raises: the index stores no token states, rebuild with --store_tokens
  if cross_needed and not allow_untrained_head:  # refuse an untrained match head before loading any model
    cross_path = os.path.abspath(rerank_export or export)
    problem = export_lib.match_head_error(cross_path, export_lib.read_metadata(cross_path),
                                          flag=export_lib.ALLOW_UNTRAINED_FLAG)
    if problem:
      raise export_lib.UntrainedHeadError(problem)
  from vldeformer_jax.retrieval.encoder import Encoder
  encoder = Encoder.load(export, allow_untrained_head=allow_untrained_head)
  cross = None
  if cross_needed:
    cross = encoder if rerank_export is None else Encoder.load(rerank_export,
                                                                allow_untrained_head=allow_untrained_head)
  record = source = None
  data_dir = data_dir or index.meta.get("data_dir")
  dataset = dataset or index.meta.get("dataset")
  if image_id is not None or (cross_needed and text is not None):
    from vldeformer_jax.data import prepare
    if not (data_dir and dataset):
      raise ValueError("an --image_id query (or a cross-encoder re-rank of a text query) needs --data_dir and "
                       "--dataset")
    source = prepare.load_split(data_dir, dataset, split or index.meta.get("split", "test"))
    if image_id is not None:
      record = find_record(source, image_id)
  return query_index(index, encoder, text=text, image_record=record, k=k, export=f"export {export}",
                     exact=exact or None, warn=warn, nprobe=nprobe, ef_search=ef_search,
                     rerank_top_k=rerank_top_k, rerank_score=rerank_score, rerank_weight=rerank_weight,
                     cross_encoder=cross, source=source)
