"""Stage 2 on the demo with MURAL's text-text task (docs/method.md §4.9): Spanish captions learned from bitext.

  python launch/make_demo_data.py --data_dir=runs/bitext/data --num_train=1000 --num_test=1000 --bitext
  python launch/train.py --config=configs/demo_bitext.py:off --workdir=runs/bitext/off \
      --config.data.data_dir=runs/bitext/data --config.init_export=runs/demo/stage1/export
  python launch/train.py --config=configs/demo_bitext.py --workdir=runs/bitext/on \
      --config.data.data_dir=runs/bitext/data --config.init_export=runs/demo/stage1/export \
      --config.data.bitext=runs/bitext/data/vldeformer_demo_train_bitext_es.json
  python launch/evaluate.py --export=runs/bitext/on/export --data_dir=runs/bitext/data \
      --dataset=vldeformer_demo_es        # language B (Spanish) test captions; vldeformer_demo: language A

The demo's stage-2 settings (`vldeformer_jax.demo.settings.stage2_config('negatives')`, the VLDeformer run of
the demo job) with captions up to 32 wordpieces in both runs (Spanish captions are longer in the English
vocabulary: up to 39 pieces, 0.9% of them cut at 32), 200 steps, and with `arg` '' (or a weight) the
text-text task: 64 caption-translation pairs per step beside the 64 image-caption pairs, weight 0.3 (`arg` ''
or 'on'; a number: that weight). Weight 1 cost English up to 3.9 points of image-to-text recall, 0.3 at most
1.0 with Spanish recall as high (docs/objectives.md).
`arg` 'off': the same run without it. The Spanish captions are never paired with an image in training.
"""
from vldeformer_jax.demo import settings


def get_config(arg=None):
  c = settings.stage2_config("negatives")
  c.data.generate = ""  # the data_dir must hold the demo prepared with --bitext (above)
  c.data.max_text_len = 32
  c.train.num_steps = 200
  c.train.eval_every = -1  # both languages are evaluated afterwards with launch/evaluate.py
  c.data.bitext_batch_size = 64
  c.loss.text_text_weight = 0.0 if arg == "off" else 0.3 if arg in (None, "", "on") else float(arg)
  return c
