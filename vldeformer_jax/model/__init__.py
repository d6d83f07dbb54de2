"""The model: its config, the Flax VLDeformer (decomposed and early-interaction forwards), its inputs.

  config.py       ModelConfig: sizes, dropout, pooling, input lengths, compute dtype; JSON round trip
  dropout.py      dropout deciding each element with 16 random bits (a quarter of flax's threefry hashes)
  vldeformer.py   the Oscar/VinVL BertImgModel in Flax: embed / match_logits / mlm_logits; init_params
  inputs.py       tokenisation and padding of captions, tags and regions; packing of matched pairs
"""
