"""The base training config: every field that `training.loop.train_and_evaluate` reads, with its default.

The repository's `configs/*.py` (and the demo's stages in `demo.settings`) start from `base_config()` and
change a few fields; any field can also be overridden on the command line:

  python launch/train.py --config=configs/demo.py --workdir=runs/demo/stage2 \
      --config.train.num_steps=500 --config.loss.temperature=0.02

Field meanings are documented next to each default. `model` holds every `ModelConfig` field: it defines the
model for a random init; with `init_export` the sizes come from the export and only the fields in
`training.setup.EXPORT_OVERRIDES` (dropout, pooling, projection, compute dtype) are taken from here.
"""
import ml_collections

from vldeformer_jax.model.config import ModelConfig


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; configs/*.py start from here and change a few."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "decompose"    # 'decompose' (stage 2, contrastive) | 'early_interaction' (stage 1)
  c.init_export = ""           # an export directory (launch/convert_checkpoint.py or a previous run); '' = random
  c.init_allow_missing = ()    # regexes of parameters an export may lack (freshly initialised, e.g. 'projection/.*')

  c.model = ml_collections.ConfigDict(ModelConfig().to_dict())

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""         # tensorflow-datasets data_dir (launch/prepare_data.py --data_dir)
  c.data.name = ""             # dataset name under data_dir (launch/prepare_data.py --name)
  c.data.generate = ""         # '' | a dataset name, equal to `name`: write the synthetic demo dataset under that
                               # name into data_dir first if it is missing (never for a name the config does not give)
  c.data.generate_num_train = 0  # with generate: training images (0 = the generator's default)
  c.data.generate_num_test = 0   # with generate: test images (0 = the generator's default)
  c.data.generate_seed = 0      # with generate: the dataset's seed (not the training seed, so runs share it)
  c.data.corpus_size = 0       # > 0: train on a demo-world pre-training corpus of this many images, generated on
                               # access (data/demo_world.CorpusSource; its world = data.generate_seed), not `name`
  c.data.corpus_seed = 1       # its images' seed (disjoint from the prepared demo data of the same world)
  c.data.mixture = ""          # 'name_a:0.7,name_b:0.3': train on these datasets mixed by weight (data/mixture.py);
                               # evaluation stays on `name`. '' = train on `name` alone
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.bitext = ""           # a bitext file (data/bitext.py): caption-translation pairs for loss.text_text_weight
  c.data.bitext_batch_size = 0  # pairs per global step (0: train.global_batch_size)
  c.data.max_text_len = 35     # caption tokens and tag tokens, each (docs/method.md §3.2); also the model's
  c.data.max_tag_len = 0       # > 0: tag tokens, when tags are shorter than captions; also the model's
  c.data.max_regions = 70      # regions per image (docs/method.md §3.2); also the model's
  c.data.num_captions_per_image = 5
  c.data.worker_count = 0      # grain worker processes (0: threads in this process)
  c.data.prefetch = 2
  c.data.negatives = ml_collections.ConfigDict()
  c.data.negatives.num_per_pair = 0      # bi-modal hard negatives per positive pair (docs/method.md §5); 0 = off
  c.data.negatives.replace_ratio = 0.3   # fraction of object words replaced in a negative caption

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 32
  c.train.num_epochs = 1       # used when num_steps == 0: epochs * (train images // global batch)
  c.train.num_steps = 0
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.05  # decoupled, not on biases and LayerNorm scales (docs/method.md §6.1)
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.max_grad_norm = 1.0  # global L2 norm; 0 = no clipping
  c.train.grad_accum_steps = 1  # micro-batches per step, each its own loss: non-contrastive objectives only
  c.train.micro_batch_size = 0  # > 0: gradient caching, this many rows per device embedded at a time; the
                                # loss and gradient stay the whole global pool's (objective 'decompose'); 0 = off
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.eval_every = 0       # 0: evaluate at the end only; -1: never
  c.train.max_to_keep = 3
  c.train.async_checkpoints = True

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "infonce"      # 'infonce' | 'hardness' | 'hinge' | 'sigmoid' (objective 'decompose')
  c.loss.temperature = 0.005   # docs/method.md §4.1: fixed, both directions
  c.loss.learnable_temperature = False  # learn log(temperature), initialised at `temperature`
  c.loss.beta = 0.0            # 'hardness': concentration (docs/method.md §4.2)
  c.loss.tau_plus = 0.0        # 'hardness': false-negative prior (docs/method.md §4.2)
  c.loss.margin = 0.2          # 'hinge'; also the late-interaction term's margin
  c.loss.text_text_weight = 0.0  # objective 'decompose': + w * symmetric InfoNCE over data.bitext pairs (§4.9)
  c.loss.topic_weight = 0.0    # objective 'decompose': + w * KL(captions' class-word bag || image's topic softmax) (§4.10)
  c.loss.late_interaction_weight = 0.0  # objective 'decompose': + w * max-violation hinge on S_MrSw (§7.5)
  c.loss.chunk_size = 0        # > 0: rows of the logits in chunks (memory), same result
  c.loss.bias_init = -10.0     # 'sigmoid': initial learnable logit bias (SigLIP; with temperature 0.1)
  c.loss.mlm_weight = 1.0      # objective 'early_interaction': weight of the MLM term

  c.early_interaction = ml_collections.ConfigDict()  # see training.early_interaction.DEFAULTS

  c.eval = ml_collections.ConfigDict()
  c.eval.protocol = "full"     # full | coco5k | coco1k | flickr1k | all (vldeformer_jax.retrieval.evaluate)
  c.eval.batch_size = 64
  c.eval.max_images = 0        # evaluate on the first N images of eval_split (0 = all)
  c.eval.best_metric = "rsum"  # 'rsum' | 'i2t_R@1' | 't2i_R@1': keeps the best checkpoint in workdir/best

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1             # -1: every device not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.model = 1
  return c

# The paper's hyperparameters (docs/method.md §6.1), shared by the COCO and Flickr30K configs.
PAPER_KEYWORDS = ("no_negatives",)


def paper_setting(c: ml_collections.ConfigDict, arg: str | None = None) -> ml_collections.ConfigDict:
  """`c` with the paper's decomposition setting: VinVL-base sizes from the export, global batch 1800,
  AdamW lr 7.5e-6, warm-up 200 + cosine, wd 0.05, clip 1.0, bf16 compute, 35/35/70 input lengths,
  temperature 0.005, dropout 0.1, seed 88, bi-modal hard negatives on (one per pair).

  `arg`: comma-separated; the keyword `no_negatives` turns the hard negatives off (plain in-batch InfoNCE);
  other items are, in order, the init export and the data_dir.
  """
  items = [a for a in (arg or "").split(",") if a]
  keywords = {a for a in items if a in PAPER_KEYWORDS}
  paths = [a for a in items if a not in PAPER_KEYWORDS]
  c.objective = "decompose"
  c.seed = 88
  c.init_export = ""  # required: a converted VinVL export
  c.model.dtype = "bfloat16"
  c.model.hidden_dropout_prob = 0.1
  c.model.attention_probs_dropout_prob = 0.1
  c.model.pooling = "mean"
  c.data.data_dir = ""  # required: where launch/prepare_data.py wrote the dataset
  c.data.train_split = "train"
  c.data.max_text_len = 35
  c.data.max_regions = 70
  c.data.num_captions_per_image = 5
  c.data.worker_count = 4
  c.train.global_batch_size = 1800
  c.train.num_epochs = 200
  c.train.num_steps = 0
  c.train.learning_rate = 7.5e-6
  c.train.warmup_steps = 200
  c.train.weight_decay = 0.05
  c.train.max_grad_norm = 1.0
  c.train.log_every = 20
  c.train.checkpoint_every = 400
  c.train.eval_every = 400
  c.train.max_to_keep = 3
  c.loss.name = "infonce"
  c.loss.temperature = 0.005
  c.eval.batch_size = 400
  c.eval.best_metric = "i2t_R@1"
  c.data.negatives.num_per_pair = 0 if "no_negatives" in keywords else 1
  if paths:
    c.init_export = paths[0]
  if len(paths) > 1:
    c.data.data_dir = paths[1]
  return c
