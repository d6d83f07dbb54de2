"""Training: `loop.train_and_evaluate(config, workdir)` and the pieces it is made of.

  defaults.py          the base config (every field) and the paper's setting
  config_checks.py     every config problem as one line, before anything compiles
  setup.py             data, the init order, the input iterator, the final export
  state.py             TrainState, its shardings and its abstract (restore-anywhere) form
  optim.py             AdamW, warm-up + cosine, decay masks
  losses.py            the gathered contrastive losses (InfoNCE, hardness, hinge; chunked, sharded)
  sigmoid_loss.py      the sigmoid (SigLIP) loss, caption blocks rotating around the devices
  early_interaction_losses.py  stage 1's match (ITM) and MLM cross-entropies
  late_interaction_term.py     the optional late-interaction (MrSw hinge) term
  text_text_term.py    the optional text-text (bitext) term
  topic.py             the optional topic target (KL to the captions' class-word bag; parameter-free head)
  grad_cache.py        gradient caching: the full-pool gradient, micro-batch by micro-batch
  decompose.py         stage 2: the decomposition objective
  early_interaction.py stage 1: the early-interaction objective (ITM, MLM, ranking, ITC)
  step.py              the jitted train step for either objective
  evaluator.py         retrieval evaluation during training
  metric_writers.py    JSON lines, TensorBoard, curves
  loop.py              the loop
"""
