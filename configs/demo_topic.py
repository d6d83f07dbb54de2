"""Stage 2 on the demo's noisy-pairs variant: plain InfoNCE, the max-violation hinge, or InfoNCE + the topic
target (docs/method.md §4.10).

  python launch/make_demo_data.py --data_dir=runs/topic/data --num_train=1000 --num_test=1000 --noisy_captions=0.2
  python launch/train.py --config=configs/demo_topic.py:topic --workdir=runs/topic/p20_topic \
      --config.data.data_dir=runs/topic/data --config.data.name=vldeformer_demo_noisy20 \
      --config.init_export=runs/demo/stage1/export
  python launch/evaluate.py --export=runs/topic/p20_topic/export --data_dir=runs/topic/data \
      --dataset=vldeformer_demo_noisy20      # its test split is the clean demo's

The demo job's stage-2 run in size (`stage2_config('')`, plain in-batch pairs, 100 steps of 32: the job's
`stage2_num_steps` / `stage2_global_batch_size`), no evaluation during training. `arg`: 'infonce' (default),
'hinge' (`loss.name = hinge`, margin 0.2), 'topic' (InfoNCE + `loss.topic_weight` 1), or 'topic:<w>'.
"""
from vldeformer_jax.demo import settings


def get_config(arg=None):
  c = settings.stage2_config("")
  c.data.generate = ""  # the data_dir must hold the noisy variant (above)
  c.train.num_steps = 100
  c.train.global_batch_size = 32
  c.train.eval_every = -1
  arm, _, weight = (arg or "infonce").partition(":")
  if arm not in ("infonce", "hinge", "topic"):
    raise ValueError(f"configs/demo_topic.py: unknown arm {arm!r}; expected infonce, hinge or topic[:<weight>]")
  if arm == "hinge":
    c.loss.name = "hinge"
  if arm == "topic":
    c.loss.topic_weight = float(weight or 1.0)
  return c
