"""Bad input to the launchers: one clear line and a non-zero exit, never a traceback.

- index queries that mean nothing: an empty or whitespace text is refused, neither --text nor --image_id
  names the flags, a text mostly outside the vocabulary ([UNK]) is answered with a warning naming the
  fraction, a text longer than the caption length with a warning saying how much was dropped;
- `launch/evaluate.py --dataset=typo` names what the data_dir holds (not tfds' catalogue); a bad flag value
  is one `usage error:` line, status 2; `--verbose` shows the traceback;
- `--protocol=all` on a split smaller than a coco1k fold says it skipped coco1k, in the JSON and the table;
- `launch/prepare_data.py --name=My-Data` is one line, status 1.
"""
import os
import subprocess
import sys

import pytest

from model_helpers import tiny_params
from vldeformer_jax.data import demo_world
from vldeformer_jax.data import prepare
from vldeformer_jax.io import export
from vldeformer_jax.model import inputs
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import evaluate
from vldeformer_jax.retrieval import index
from vldeformer_jax.retrieval import index_build
from vldeformer_jax.retrieval import index_query
from vldeformer_jax.retrieval.encoder import Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_text_len=16,
            max_regions=6)
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad_input")
  cfg = ModelConfig(**TINY)
  export.write_export(str(d / "export"), tiny_params(cfg, 0), cfg, inputs.BUNDLED_VOCAB)
  name = demo_world.prepare_demo(str(d / "data"), seed=0, num_train=4, num_test=20)
  enc = Encoder.load(str(d / "export"), batch_size=8)
  index_build.build_index(enc, prepare.load_split(str(d / "data"), name, "test"), str(d / "idx"), side="images")
  return d, name


def _launch(script, *args):
  return subprocess.run([sys.executable, os.path.join("launch", script), *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith(("error:", "usage error:", "config error:",
                                                          "prepare_data: error:"))]


def test_text_queries_that_mean_nothing_are_refused_or_warned(tiny):
  d, _ = tiny

  def query(**kw):
    warned = []
    rows = index_query.run_query(str(d / "idx"), str(d / "export"), warn=warned.append, **kw)
    return rows, warned

  for text in ("", "   ", "\t\n"):
    with pytest.raises(ValueError) as e:
      query(text=text)
    assert str(e.value) == "--text is empty (or only whitespace): there is nothing to search for"
  with pytest.raises(ValueError) as e:
    query()
  assert str(e.value) == ("give exactly one of --text (a caption to search images or captions with) and "
                          "--image_id (an image of --dataset/--split)")
  rows, warned = query(text="a red car left of a dog")
  assert len(rows) == 10 and warned == []
  _, warned = query(text="🙂 🙂 🙂")
  assert warned == ["3 of the 3 wordpieces of the text query (100%) are [UNK], outside the model's vocabulary: "
                    "the results say little about the text"]
  _, warned = query(text="一只红色的狗在车的左边")  # the vocabulary holds a few CJK characters, not these
  assert warned == ["8 of the 11 wordpieces of the text query (73%) are [UNK], outside the model's vocabulary: "
                    "the results say little about the text"]
  _, warned = query(text=" ".join(["dog"] * 5000))
  assert warned == ["the text query has 5000 wordpieces; the model reads the first 14 (max_text_len 16 with "
                    "[CLS] and [SEP]): 4986 dropped"]
  enc = Encoder.load(str(d / "export"))
  with pytest.raises(ValueError, match="the text query is empty"):  # the library entry refuses it too
    index_query.query_index(index.Index.load(str(d / "idx")), enc, text=" ")


def test_index_cli_empty_query_is_one_line_and_unknown_words_warn(tiny):
  d, _ = tiny
  common = [f"--export={d / 'export'}", f"--index={d / 'idx'}"]
  r = _launch("index.py", "query", *common, "--text=  ")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert _error_lines(r.stderr) == ["error: --text is empty (or only whitespace): there is nothing to search for"]
  assert r.stdout == ""
  r = _launch("index.py", "query", *common, "--text=🙂 🙂 🙂", "--k=3")
  assert r.returncode == 0, r.stderr[-2000:]
  assert ("warning: 3 of the 3 wordpieces of the text query (100%) are [UNK], outside the model's vocabulary: "
          "the results say little about the text") in r.stderr.splitlines()
  assert len(r.stdout.strip().splitlines()) == 3


def test_evaluate_cli_names_what_the_data_dir_holds(tiny):
  d, name = tiny
  data_dir = str(d / "data")
  r = _launch("evaluate.py", f"--export={d / 'export'}", f"--data_dir={data_dir}", "--dataset=typo")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert _error_lines(r.stderr) == [f"error: dataset 'typo' not found in {data_dir} (it holds: {name}); prepare it "
                                    "with launch/prepare_data.py"]
  assert "mnist" not in r.stderr  # not tfds' catalogue of public datasets
  assert prepare.missing_dataset(data_dir, name[:-2] + name[-1] + name[-2]) == (
      f"dataset {name[:-2] + name[-1] + name[-2]!r} not found in {data_dir} (it holds: {name}; did you mean "
      f"{name!r}?); prepare it with launch/prepare_data.py")
  with pytest.raises(FileNotFoundError) as e:
    prepare.load_split(data_dir, name, "tset")
  assert str(e.value) == f"dataset {name!r} in {data_dir} has no split 'tset' (it has: test, test_1k, train)"
  # A bad flag value: one line, status 2, before anything loads; --verbose: the traceback.
  r = _launch("evaluate.py", f"--export={d / 'export'}", f"--data_dir={data_dir}", f"--dataset={name}",
              "--protocol=coco2k")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
  assert r.stderr.startswith("usage error: flag --protocol=coco2k: value should be one of ")
  r = _launch("index.py", "query", f"--export={d / 'export'}", f"--index={d / 'nope'}", "--text=a dog", "--verbose")
  assert r.returncode == 1 and "Traceback" in r.stderr and "BadIndexError: index not found" in r.stderr


def test_protocol_all_says_when_it_skips_coco1k(tiny):
  d, name = tiny
  enc = Encoder.load(str(d / "export"), batch_size=8)
  results = evaluate.evaluate(enc, prepare.load_split(str(d / "data"), name, "test"), protocol="all",
                              progress=False)
  assert results["protocols"] == {}
  assert results["skipped_protocols"] == {"coco1k": "needs folds of 1000 images; 20 evaluated"}
  table = evaluate.format_table({"decomposed": results})
  assert "  decomposed (20 img) coco1k: skipped (needs folds of 1000 images; 20 evaluated)" not in table
  assert "  decomposed coco1k: skipped (needs folds of 1000 images; 20 evaluated)" in table.splitlines()


def test_prepare_data_bad_name_is_one_line(tmp_path):
  r = _launch("prepare_data.py", f"--captions_dir={tmp_path}", f"--features_dir={tmp_path}", "--name=My-Data",
              f"--data_dir={tmp_path / 'out'}")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert _error_lines(r.stderr) == ["prepare_data: error: dataset name 'My-Data' must be snake_case "
                                    "([a-z][a-z0-9_]*), as tfds requires"]
  assert not (tmp_path / "out").exists()


def test_malformed_input_files_name_the_file_and_line(tmp_path):
  from vldeformer_jax.data import vinvl
  from vldeformer_jax.retrieval import suite
  from vldeformer_jax.training import checkpoint_export, setup
  (tmp_path / "s.json").write_text('{"datasets": [\n  {"name": "x",}\n]}')
  with pytest.raises(ValueError, match=r"s\.json: malformed JSON: .*line 2"):
    suite.load_suite(str(tmp_path / "s.json"))
  (tmp_path / "s.yaml").write_text("datasets:\n  - {name: x, data_dir: [unclosed\n")
  with pytest.raises(ValueError, match=r"s\.yaml: malformed YAML \(line \d+\)"):
    suite.load_suite(str(tmp_path / "s.yaml"))
  with pytest.raises(FileNotFoundError, match=r"suite file not found: .*nope\.yaml"):
    suite.load_suite(str(tmp_path / "nope.yaml"))
  (tmp_path / "captions.json").write_text('{"1": ["a dog"]')
  with pytest.raises(vinvl.VinvlFormatError, match=r"captions\.json: malformed JSON"):
    vinvl.load_captions(str(tmp_path / "captions.json"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / setup.TRAIN_CONFIG_FILE).write_text('{"train": ')
  with pytest.raises(ValueError, match=rf"{setup.TRAIN_CONFIG_FILE}: malformed JSON"):
    checkpoint_export._training_config(str(workdir))
