"""What the project reads and writes: atomic files, checkpoint conversion, the export, orbax checkpoints.

  files.py        atomic writes (temporary sibling, then rename): nothing half-written is ever seen
  convert.py      PyTorch / safetensors state dict -> Flax tree (rule table, shape checks, named errors)
  export.py       the one export format (config, vocabulary, parameters, fingerprint)
  checkpoint.py   orbax training checkpoints with the input pipeline's state; the best checkpoint
"""
