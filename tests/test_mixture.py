"""Training on several prepared datasets mixed by weight (`config.data.mixture`, data/mixture.py).

- the arithmetic: parsing, largest-remainder shares, the virtual index -> (dataset, record) map;
- two prepared demo datasets at weights 0.7 / 0.3: the fraction of training samples from each, over
  10,000 samples of the real pipeline, within 2 points of the weight;
- the same global batches on 1 and 2 processes (every key, every byte), and a resumed iterator equals an
  uninterrupted one;
- config errors name the item; the Flickr config's `two_datasets` mixes COCO and Flickr30K by size.
"""
import numpy as np
import pytest

from repo_configs import get_config
from vldeformer_jax.data import demo_world, mixture, pipeline, prepare
from vldeformer_jax.model import inputs
from vldeformer_jax.training import config_checks

TOKENIZER = inputs.load_tokenizer()
G = 20  # global batch


def test_parse_and_shares():
  assert mixture.parse_mixture("coco:0.7, flickr:0.3") == [("coco", 0.7), ("flickr", 0.3)]
  assert mixture.parse_mixture("a:3,b:1") == [("a", 0.75), ("b", 0.25)]
  for bad, what in (("coco", "'coco' is not 'dataset_name:weight'"), ("a:1,a:2", "appears twice"),
                    ("a:0,b:1", "weights must be positive"), ("A-B:1", "'A-B:1' is not")):
    with pytest.raises(ValueError, match=what):
      mixture.parse_mixture(bad)
  assert mixture.share_counts(10, [0.7, 0.3]).tolist() == [7, 3]
  assert mixture.share_counts(7, [1 / 3] * 3).tolist() == [3, 2, 2]  # largest remainder: sums to 7
  assert mixture.share_counts(1001, [0.5, 0.25, 0.25]).sum() == 1001


def test_virtual_records_cover_each_dataset_by_a_seeded_permutation():
  a, b = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(20)]
  m = mixture.MixtureSource([a, b], [0.7, 0.3], seed=5, names=["a", "b"])
  assert len(m) == 143 and m.counts.tolist() == [100, 43]  # the smallest epoch that holds all of `a`
  records = [m[i] for i in range(len(m))]
  assert sorted(records[:100]) == sorted(a)  # every `a` record once
  from_b = records[100:]
  assert set(from_b) == set(b) and all(from_b.count(x) in (2, 3) for x in b)  # 43 = 2 x 20 + 3: repeated evenly
  assert m.dataset_of([0, 99, 100, 142]).tolist() == [0, 0, 1, 1]
  assert [m[i] for i in range(len(m))] == records  # pure function of (seed, index)
  other_seed = mixture.MixtureSource([a, b], [0.7, 0.3], seed=6)
  assert sorted(other_seed[i] for i in range(100)) == sorted(a)
  assert [other_seed[i] for i in range(100)] != records[:100]  # another seed, another order


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("mixture") / "data")
  demo_world.prepare_demo(data_dir, seed=1, num_train=60, num_test=4, name="mix_a")
  demo_world.prepare_demo(data_dir, seed=2, num_train=40, num_test=4, name="mix_b")
  return data_dir


def _source(data_dir, seed=0):
  parts = mixture.parse_mixture("mix_a:0.7,mix_b:0.3")
  return mixture.MixtureSource([prepare.load_split(data_dir, n, "train") for n, _ in parts],
                               [w for _, w in parts], seed=seed, names=[n for n, _ in parts])


def _iterator(source, process_index=0, process_count=1, negatives=1):
  return pipeline.make_train_iterator(
      source, tokenizer=TOKENIZER, global_batch_size=G, seed=3, max_text_len=22, max_tag_len=8, max_regions=6,
      feature_dim=2054, negatives_per_pair=negatives, process_index=process_index, process_count=process_count,
      prefetch=0)


def test_measured_fractions_follow_the_weights(two_datasets):
  source = _source(two_datasets)
  it = _iterator(source, negatives=0)
  steps = 10_000 // G
  datasets = np.concatenate([source.dataset_of(it.builder.image_indices(s)[1]) for s in range(steps)])
  assert datasets.size == 10_000
  fractions = np.bincount(datasets, minlength=2) / datasets.size
  print("measured fractions over 10,000 samples:", fractions)
  assert abs(fractions[0] - 0.7) < 0.02 and abs(fractions[1] - 0.3) < 0.02
  # The records of a batch are those of the datasets the indices name, features and all.
  step0 = it.batch_at(0)
  for row, index in enumerate(it.builder.image_indices(0)[1]):
    d, i = source.locate(int(index))
    assert step0["image_id"][row] == int(source.sources[d][i]["image_id"])


def test_same_global_batches_on_one_and_two_processes_and_exact_resume(two_datasets):
  source = _source(two_datasets)
  steps = 7  # more than one epoch of the mixture (86 virtual records // 20 = 4 steps per epoch)
  one = _iterator(source)
  single = [next(one) for _ in range(steps)]
  halves = [_iterator(source, p, 2) for p in range(2)]
  for s in range(steps):
    parts = [next(h) for h in halves]  # each process's rows of global step s
    for k in single[s]:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), single[s][k], err_msg=f"{k} step {s}")
  resumed = _iterator(source)
  state = {**one.get_state(), "step": 3}
  resumed.set_state(state)
  for s in range(3, steps):
    got = next(resumed)
    for k in got:
      np.testing.assert_array_equal(got[k], single[s][k], err_msg=f"{k} step {s}")


def test_config_errors_and_the_two_dataset_flickr_config(two_datasets):
  c = get_config("tiny")
  c.data.data_dir, c.data.generate, c.data.name = two_datasets, "", "mix_a"
  c.data.mixture = "mix_a:0.7,mix_b:0.3"
  assert config_checks.validate(c, device_count=1, process_count=1) == []
  c.data.mixture = "mix_a:0.7,mix_c:0.3"
  assert config_checks.validate(c, device_count=1, process_count=1) == [
      f"config.data.mixture: dataset 'mix_c' not found in {two_datasets}; prepare it with launch/prepare_data.py"]
  c.data.mixture = "mix_a=0.7"
  assert config_checks.validate(c, device_count=1, process_count=1) == [
      "config.data.mixture: 'mix_a=0.7' is not 'dataset_name:weight' (in 'mix_a=0.7')"]
  flickr = get_config("vinvl_base_flickr", "two_datasets")
  assert flickr.data.mixture == "vinvl_coco:113287,vinvl_flickr:29000" and flickr.data.name == "vinvl_flickr"
  assert flickr.eval.protocol == "flickr1k" and flickr.data.negatives.num_per_pair == 1
  assert get_config("vinvl_base_flickr", "two_datasets,no_negatives").data.negatives.num_per_pair == 0
  assert get_config("vinvl_base_flickr").data.mixture == ""
