"""Renders the collected benchmark results (a dict of per-table JSON) as BENCHMARKS.md.

Kept apart from the measuring code so the wording of goals and the units live in one place: every goal
line states the measured value, the target, and met / NOT met.
"""
from __future__ import annotations

from typing import Any

GIB = 2**30


def _s(x: float) -> str:
  return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def _gib(b: float) -> str:
  return f"{b / GIB:.2f} GiB" if abs(b) >= 0.1 * GIB else f"{b / 2**20:.0f} MiB"


def _goal(met: bool, text: str) -> str:
  return f"- **Goal {'met' if met else 'NOT met'}**: {text}"


def _error(section: dict) -> str | None:
  return f"_This table failed to run:_\n\n```\n{section['error']}\n```\n" if "error" in section else None


def machine(r: dict) -> str:
  m = r["machine"]
  v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
  load = ", ".join(f"{x:.1f}" for x in m.get("load_average", ()))
  env = ", ".join(f"`{k}={val}`" for k, val in m.get("env", {}).items()) or "none set"
  return (f"- CPU: {m.get('cpu', '?')} ({m.get('simd', '')}), {m['cores']} cores, "
          f"{m.get('memory_gib', '?')} GiB memory; {m['platform']}, Python {m['python']}\n"
          f"- Libraries: {v}\n- Environment: {env}\n- Load average at start (1, 5, 15 min): {load}\n")


def peaks(p: dict) -> str:
  if (e := _error(p)):
    return e
  lines = ["| library | dtype | size | fastest / median | GFLOP/s (fastest) |", "|---|---|---|---|---|"]
  for key in ("jax_float32", "jax_bfloat16", "torch_float32", "torch_bfloat16"):
    x = p[key]
    lines.append(f"| {key.split('_')[0]} | {x['dtype']} | {x['n']}^3 | {_s(x['seconds']['min'])} / "
                 f"{_s(x['seconds']['median'])} | "
                 f"{x['gflops']:.1f} |")
  note = ""
  if p["torch_bfloat16"]["n"] != p["torch_float32"]["n"]:
    note = (f"\nPyTorch bfloat16 is measured at {p['torch_bfloat16']['n']}^3: this CPU has no native bf16 "
            "matmul (no AVX512-BF16 / AMX) and PyTorch's fallback needs minutes at 4096^3.\n")
  return "\n".join(lines) + "\n" + note


def train_step(t: dict, load: float | None = None, cores: int | None = None) -> str:
  if (e := _error(t)):
    return e
  c = t["config"]
  f = t["analytic_flops"]
  lines = [
      f"Model: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, "
      f"intermediate {c['intermediate_size']}, vocab {c['vocab_size']}; {c['max_text_len']} caption tokens; "
      f"{c.get('max_tag_len') or c['max_text_len']} tag tokens + {c['max_regions']} regions of "
      f"{c['img_feature_dim']}-d; batch "
      f"{t['batch_size']} on 1 device, float32, dropout 0.1, AdamW + clipping.",
      "",
      "| | JAX (training/step.py step, jitted) | PyTorch eager |",
      "|---|---|---|",
      f"| median step ({t['jax_step']['n']} interleaved runs) | {_s(t['jax_step']['median'])} | "
      f"{_s(t['torch_step']['median'])} |",
      f"| min / max | {_s(t['jax_step']['min'])} / {_s(t['jax_step']['max'])} | "
      f"{_s(t['torch_step']['min'])} / {_s(t['torch_step']['max'])} |",
      f"| achieved GFLOP/s (analytic count) | {t['jax_gflops']:.1f} | {t['torch_gflops']:.1f} |",
      "",
      f"- Ratio JAX / PyTorch (median): **{t['ratio']:.2f}** (per-pair ratios: "
      f"{', '.join(f'{x:.2f}' for x in t['ratios'])})",
      f"- FLOPs per step, analytic (matmuls: dense layers, attention QK^T and PV, region projection; "
      f"backward = 2x forward, 1x for the region projection): {f['train_step'] / 1e9:.0f} GFLOP "
      f"(forward {f['forward'] / 1e9:.0f}); XLA's cost analysis of the compiled step: "
      f"{t['xla_flops'] / 1e9:.0f} GFLOP",
      f"- JAX fp32 matmul peak measured in the same process (fastest of {t['jax_fp32_peak']['seconds']['n']} "
      f"runs): {t['jax_fp32_peak']['gflops']:.1f} GFLOP/s; "
      f"the step reaches **{100 * t['fraction_of_jax_fp32_peak']:.1f}%** of it",
      *_dense_matmul_lines(t.get("dense_matmuls")),
      f"- Peak RSS of the process (JAX and PyTorch models, both optimisers): {t['peak_rss_gib']:.1f} GiB; "
      f"XLA temporaries of the step: {_gib(t.get('xla_temp_bytes', 0))}",
      _goal(t["ratio"] <= 1.0, f"JAX/PyTorch step time ratio {t['ratio']:.2f} (target <= 1.00)"),
      _goal(t["fraction_of_jax_fp32_peak"] >= 0.80,
            f"{100 * t['fraction_of_jax_fp32_peak']:.1f}% of XLA's fp32 matmul peak (target >= 80%)"),
  ]
  ceiling = (t.get("dense_matmuls") or {}).get("xla_fraction_of_peak", 0.0)
  if t["fraction_of_jax_fp32_peak"] > 1.0 or ceiling > 1.0 or (load and cores and load > cores):
    at_start = f" (load average {load:.1f} on {cores} cores at the start)" if load is not None and cores else ""
    lines.append(
        f"- **Inconclusive**: this run shared the machine{at_start}. A fraction above 100% means the peak "
        "measurement itself was "
        "depressed by other processes, and the per-pair ratios spread widely: the two libraries do not slow "
        "down equally under contention. Re-run on an idle machine before quoting either goal.")
  return "\n".join(lines) + "\n"


def _dense_matmul_lines(m: dict | None) -> list[str]:
  """Table 1's matmul ceiling (train_step._dense_matmul_ceiling); runs before it was measured have none."""
  if not m:
    return []
  return [f"- The step's dense-layer matmuls alone ({m['gflop']:.0f} GFLOP: both branches, forward + both "
          f"backward products, same shapes, same process): XLA {m['xla_gflops']:.1f} GFLOP/s, "
          f"**{100 * m['xla_fraction_of_peak']:.1f}%** of the peak above; PyTorch {m['torch_gflops']:.1f} GFLOP/s; "
          f"XLA / PyTorch time **{m['ratio']:.2f}**. The first is a ceiling on the step's fraction of the peak "
          "(everything else in the step only adds time); the second is the ratio the step would have if it were "
          "nothing but these matmuls."]


def ablations(a: dict) -> str:
  if (e := _error(a)):
    return e
  lines = ["| what | variant | median | vs first variant |", "|---|---|---|---|"]
  for group in a["groups"]:
    base = None
    for v in group["variants"]:
      med = v["seconds"]["median"]
      base = base or med
      lines.append(f"| {group['name']} | {v['name']} | {_s(med)} | {med / base:.2f}x |")
  notes = "\n".join(f"- {n}" for n in a.get("notes", []))
  return "\n".join(lines) + "\n\n" + notes + "\n"


def contrastive(c: dict) -> str:
  if (e := _error(c)):
    return e
  lines = ["| pairs | pool (columns) | loss | XLA temp | measured extra RSS | extra minus gradients | "
           "loss + grad time |", "|---|---|---|---|---|---|---|"]
  goal_row = None
  for row in c["rows"]:
    kind = f"chunked ({row['chunk_size']} rows)" if row["chunk_size"] else "naive"
    if row["executed"]:
      meas = _gib(row["extra_bytes"])
      minus = _gib(row["extra_minus_outputs_bytes"])
      tm = f"{_s(row['seconds']['median'])} (n={row['seconds']['n']})"
    else:
      meas = minus = "not run"
      tm = "not run (compiled only)"
    lines.append(f"| {row['pairs']:,} | {row['pool']:,} | {kind} | {_gib(row['xla_temp_bytes'])} | {meas} | "
                 f"{minus} | {tm} |")
    if row["pairs"] == 65536 and row["chunk_size"]:
      goal_row = row
  out = "\n".join(lines) + "\n\n"
  out += ("768-d, one composed hard negative per pair on each side (K=1), so each of the N text queries "
          "scores 2N image columns and vice versa. Naive = `chunk_size=0` (the whole [N, 2N] logits); "
          "chunked = `losses.contrastive_loss(chunk_size=...)`. XLA temp = `compiled.memory_analysis()."
          "temp_size_in_bytes` (working memory beyond arguments and outputs); measured = peak current RSS "
          "during the call minus the RSS before it, in a fresh process per row; 'minus gradients' subtracts "
          "the 4 returned gradient arrays. Sizes above the run limit are compiled for XLA's plan only: the "
          "naive 64K case needs 32 GiB for the logits alone, and the 64K loss + gradient is ~100 TFLOP "
          "(hours on these 2 cores).\n")
  if goal_row is not None:
    temp = goal_row["xla_temp_bytes"]
    out += _goal(temp <= GIB, f"chunked loss + gradient at 64K pairs needs {_gib(temp)} of working memory "
                 "beyond its inputs and outputs (XLA's plan; target <= 1 GiB)") + "\n"
  return out


def search(s: dict) -> str:
  if (e := _error(s)):
    return e
  lines = ["| gallery | JAX exact (retrieval/index.py) | faiss IndexFlatIP | numpy matmul + argpartition | "
           "JAX / faiss | agreement with faiss |", "|---|---|---|---|---|---|"]
  goals = []
  for row in s["rows"]:
    np_t = _s(row["numpy_seconds"]["median"]) if "numpy_seconds" in row else "not run"
    ag = row["agree_jax_faiss"]
    agree = (f"JAX: {ag['rows'] - ag['rows_differing']}/{ag['rows']} rows identical sets, max score diff "
             f"{ag['max_score_abs_diff']:.1e}")
    if "agree_numpy_faiss" in row:
      an = row["agree_numpy_faiss"]
      agree += f"; numpy: {an['rows'] - an['rows_differing']}/{an['rows']}"
    lines.append(f"| {row['gallery']:,} x {row['dim']} | {_s(row['jax_seconds']['median'])} | "
                 f"{_s(row['faiss_seconds']['median'])} | {np_t} | {row['jax_vs_faiss']:.2f} | {agree} |")
    goals.append(_goal(row["jax_vs_faiss"] <= 1.0 and ag["ok"],
                       f"{row['gallery']:,} rows: JAX / faiss time ratio {row['jax_vs_faiss']:.2f} (target <= 1.00), "
                       f"results {'agree' if ag['ok'] else 'DISAGREE'}"))
  first = s["rows"][0]
  out = "\n".join(lines) + "\n\n"
  out += (f"Top-{first['k']} of {first['queries']} L2-normalised float32 queries over random L2-normalised "
          f"galleries; medians of interleaved runs; faiss uses {first['faiss_threads']} OpenMP threads, JAX "
          f"{first['jax_devices']} CPU device (XLA's intra-op thread pool). faiss SIMD build: "
          f"{first.get('faiss_build', 'not recorded')}.\n\n")
  slow = [r for r in s["rows"] if "numpy_seconds" in r and r["faiss_seconds"]["median"] > r["numpy_seconds"]["median"]]
  if slow:  # faiss below numpy's matmul: its BLAS, not its SIMD level, is the bottleneck on this machine
    out += ("**Caveat**: faiss is slower than numpy's matmul + argpartition here ("
            + ", ".join(f"{r['gallery']:,}: JAX / numpy {r['jax_seconds']['median'] / r['numpy_seconds']['median']:.2f}"
                        for r in slow)
            + "), so its BLAS underperforms on this CPU and the JAX / faiss ratio overstates JAX's lead; the "
            "JAX / numpy ratio is the fairer one.\n\n")
  return out + "\n".join(goals) + "\n"


def pipeline(p: dict) -> str:
  """Table 6: pairs per CPU-second of the input pipeline per storage layout, with and without negatives."""
  if (e := _error(p)):
    return e
  rows = [r for r in p["rows"] if "error" not in r]
  before = {r["negatives_per_pair"]: r for r in rows if r["layout"].startswith("before")}
  lines = ["| stored layout (prepare options), pipeline code | hard negatives | pairs / CPU-second | "
           "pairs / wall second | vs before |", "|---|---|---|---|---|"]
  for r in rows:
    k = r["negatives_per_pair"]
    ref = before.get(k)
    vs = f"{r['pairs_per_cpu_second'] / ref['pairs_per_cpu_second']:.2f}x" if ref else ""
    lines.append(f"| {r['layout']} | {'1 per pair' if k else 'none'} | {r['pairs_per_cpu_second']:.0f} | "
                 f"{r['pairs_per_wall_second']:.0f} | {vs} |")
  lines += [f"| {r['layout']} | | failed: {r['error']} | | |" for r in p["rows"] if "error" in r]
  first = rows[0]
  out = "\n".join(lines) + "\n\n"
  out += (f"A prepared dataset of {p['num_images']:,} images at the VinVL shape ({p['regions']} regions x "
          f"{p['feature_dim']} features, 5 captions of 8-16 words, {p['regions']} detector tags, "
          f"{p['max_text_len']} caption and tag tokens), written by `prepare_vinvl` once per layout; "
          f"`BatchBuilder` batches of {first['batch']} pairs ({first['steps']} steps after one warm-up) put on "
          "the device as global `jax.Array`s (`parallel.global_batch`), one process, no prefetch threads. "
          "Pairs / CPU-second = pairs over the process's CPU time (all threads): one core's rate, which other "
          "processes' load on a shared machine does not lower.\n\n")
  goal = p["goal_pairs_per_core"]
  best = max((r for r in rows if r["negatives_per_pair"] and not r["layout"].startswith("before")),
             key=lambda r: r["pairs_per_cpu_second"], default=None)
  if best:
    out += _goal(best["pairs_per_cpu_second"] >= goal,
                 f"{best['pairs_per_cpu_second']:.0f} pairs/s per core with hard negatives, layout "
                 f"{best['layout']!r} (target >= {goal:.0f})") + "\n"
    f32 = next((r for r in rows if r["negatives_per_pair"] and r["layout"] == "float32, uncompressed"), None)
    if f32 and f32 is not best:
      out += (f"- float32 features (exact) with hard negatives: {f32['pairs_per_cpu_second']:.0f} pairs/s per core "
              f"({'meets' if f32['pairs_per_cpu_second'] >= goal else 'below'} the {goal:.0f} target)\n")
  return out


def _modes_demo(d: dict) -> str:
  if "skipped" in d:
    return f"_Demo split: skipped ({d['skipped']})._\n"
  if (e := _error(d)):
    return e
  lines = [f"**Demo test split** ({d['num_images']} images x {d['num_captions'] // d['num_images']} captions, "
           f"{d['dim']}-d embeddings of the stage-2 export; recall in %, both directions against the true pairs; "
           f"queries/s over the {d['num_images'] + d['num_captions']} queries of both directions, search and "
           f"re-scoring only, query encoding excluded; `+rescore`: Hamming shortlist of {d['shortlists'][-1]} "
           f"rows re-scored with the float embeddings; re-rankers: the float top-{d['rerank_k']}).", "",
           "| mode | t2i R@1 / R@5 / R@10 | i2t R@1 / R@5 / R@10 | avg R@10 | queries/s | bytes per item |",
           "|---|---|---|---|---|---|"]
  for r in d["rows"]:
    t, i = r["t2i"], r["i2t"]
    lines.append(f"| {r['mode']} | {t['R@1']:.1f} / {t['R@5']:.1f} / {t['R@10']:.1f} | {i['R@1']:.1f} / "
                 f"{i['R@5']:.1f} / {i['R@10']:.1f} | {r['avg']['R@10']:.1f} | {r['queries_per_s']:,.0f} | "
                 f"{r['bytes_per_item']} |")
  out = "\n".join(lines) + "\n\n"
  # Distilled vs data-independent codes of the same length, same shortlist, same float re-score.
  by = {}
  for r in d["codes"]:
    kind, bits = r["mode"].split("+")[0].rsplit("-", 1)
    col = "codes only" if "+" not in r["mode"] else f"+rescore@{r['shortlist']}"
    by.setdefault(int(bits), {}).setdefault(col, {})["distilled" if kind == "distilled" else "baseline"] = r
    by[int(bits)]["baseline_name"] = kind if kind != "distilled" else by[int(bits)].get("baseline_name")
  cols = ["codes only"] + [f"+rescore@{s}" for s in d["shortlists"]]
  lines = ["**Codes of B bits, avg R@10 (t2i, i2t)**: the data-independent baseline of the same length (the D "
           "sign bits when B = D, else SimHash) vs the distilled head (trained on the train split's embeddings, "
           f"{d['steps']} steps); the loss is the distillation loss with sign codes on a fixed train batch.", "",
           "| B | bytes | baseline | " + " | ".join(f"{c}: baseline / distilled" for c in cols) + " | loss baseline -> distilled |",
           "|---|---|---|" + "---|" * len(cols) + "---|"]
  for bits in sorted(by):
    b = by[bits]
    cells = []
    for c in cols:
      x, y = b[c]["baseline"], b[c]["distilled"]
      cells.append(f"{x['avg']['R@10']:.1f} ({x['t2i']['R@10']:.1f}, {x['i2t']['R@10']:.1f}) / "
                   f"**{y['avg']['R@10']:.1f}** ({y['t2i']['R@10']:.1f}, {y['i2t']['R@10']:.1f})")
    ls = d["distill"].get(str(bits)) or d["distill"].get(bits) or {}
    lines.append(f"| {bits} | {bits // 8} | {b['baseline_name']} | " + " | ".join(cells) +
                 f" | {ls.get('sign_loss_before', float('nan')):.3f} -> {ls.get('sign_loss_after', float('nan')):.3f} |")
  out += "\n".join(lines) + "\n"
  if d.get("notes"):
    out += "\n" + "\n".join(f"- not measured: {n}" for n in d["notes"]) + "\n"
  return out


def _modes_large(g: dict) -> str:
  if (e := _error(g)):
    return e
  lines = [f"**{g['n']:,} x {g['dim']} synthetic** ({g['clusters']} Gaussian clusters, L2-normalised; "
           f"{g['queries']} queries from the same clusters): recall@10 against exact float search, queries/s "
           f"for top-10 (one timed call each, compilation included), bytes per item and the gallery's size in memory. Codes: B = {g['bits']}, "
           f"shortlist {g['shortlist']}; the distilled head trained on {g['distill_sample']:,} gallery rows "
           f"({g['distill_steps']} steps, {g['distill_seconds']:.0f} s).", "",
           "| mode | recall@10 vs exact | queries/s | bytes per item | gallery in memory | note |",
           "|---|---|---|---|---|---|"]
  for r in g["rows"]:
    mem = _gib(r["gallery_bytes"]) if r.get("gallery_bytes") else ""
    note = r.get("note", "")
    if "build_seconds" in r:
      note = f"built on {r['gallery_rows']:,} rows in {r['build_seconds']:.0f} s; {r['params']}"
    lines.append(f"| {r['mode']} | {r['recall@10_vs_exact']:.3f} | {r['queries_per_s']:,.0f} | {r['bytes_per_item']} | "
                 f"{mem} | {note} |")
  out = "\n".join(lines) + "\n"
  if g.get("notes"):
    out += "\n" + "\n".join(f"- {n}" for n in g["notes"]) + "\n"
  return out + (f"\nPeak RSS of the process: {_gib(g['peak_rss_bytes'])} (the float gallery is a memory-mapped "
                ".npy; faiss IVF holds its own copy of the rows). Cross-encoder and late-interaction re-ranking "
                "have no rows here (no regions or token states for synthetic vectors): their cost per query is "
                "k pair scores whatever the gallery size, as on the demo split, plus the first stage.\n")


def modes(m: dict) -> str:
  """Retrieval modes: the demo split's recall / speed / bytes, and the 1M-row speed / memory."""
  if (e := _error(m)):
    return e
  return _modes_demo(m["demo"]) + "\n" + _modes_large(m["large"])


def accelerator(a: dict) -> str:
  """Table 7: the accelerator path (benchmarks/accelerator.py), or the note that none was at hand."""
  if (e := _error(a)):
    return e
  t, s, enc, d = a["train_step"], a["search"], a["encoder"], a["demo"]
  note = ""
  if a["platform"] == "cpu":
    note = ("**No accelerator was at hand for this run**: these are the CPU smoke-test figures of the harness "
            f"({'tiny sizes' if a.get('tiny') else 'full sizes'}), not accelerator figures. On a GPU / TPU host run "
            "`python benchmarks/run.py --tables accelerator`.\n\n")
  lines = [f"Device: {a['device_kind']} ({a['platform']}, {a['device_count']} device(s)); peak "
           f"{a['peak']['tflops']:.1f} TFLOP/s bf16 ({a['peak']['source']}).", "",
           "| measurement | result |", "|---|---|",
           f"| train step, {t['layers']} x {t['hidden']}, batch {t['batch_size']}, bfloat16 | "
           f"{_s(t['seconds']['median'])}, {t['pairs_per_s']:.0f} pairs/s, {t['achieved_tflops']:.2f} TFLOP/s, "
           f"**MFU {100 * t['mfu']:.1f}%** |",
           f"| encoder ({enc['layers']} x {enc['hidden']}, bfloat16, batch {enc['batch_size']}) | "
           f"{enc['images_per_s']:.0f} images/s, {enc['captions_per_s']:.0f} captions/s |",
           f"| exact top-10 search, {s['gallery']:,} x 768, {s['queries']} queries (gallery in host memory) | "
           f"{_s(s['seconds']['median'])}, {s['queries_per_s']:.0f} queries/s, spot check "
           f"{'exact' if s['spot_check_exact'] else 'NOT exact'} |",
           f"| demo end to end ({d['mode']}) | " + (f"{_s(d['seconds'])}, exit {d['returncode']}" if "seconds" in d
                                                     else "not run") + " |"]
  return note + "\n".join(lines) + "\n"


def encoder(e: dict) -> str:
  if (err := _error(e)):
    return err
  lines = ["| model | compute dtype | batch | images/s | captions/s |", "|---|---|---|---|---|"]
  for row in e["rows"]:
    if row["size"] != "bert_base":
      name = f"demo ({row['layers']} x {row['hidden']})"
    elif row["layers"] == 12:
      name = f"BERT-base ({row['layers']} x {row['hidden']})"
    else:
      name = f"BERT-base widths, {row['layers']} layers ({row['layers']} x {row['hidden']})"
    lines.append(f"| {name} | {row['dtype']} | {row['batch_size']} | {row['images_per_s']:.1f} | "
                 f"{row['captions_per_s']:.1f} |")
  return "\n".join(lines) + ("\n\n`Encoder.embed_images(regions, tags)` / `Encoder.embed_texts(captions)` "
                             "end to end (tokenising, padding, batching, the jitted forward, L2 "
                             "normalisation), compile excluded, random weights.\n")


_POOL_NAMES = {"plain": ("off", "none"), "remat": ("off", "full"), "grad_cache": ("on", "none"),
               "grad_cache_remat": ("on", "full")}


def pool(p: dict) -> str:
  if (e := _error(p)):
    return e
  m, t = p["memory"], p["timing"]
  if (e := _error(m)) or (e := _error(t)):
    return e
  variants = {v["variant"]: v for v in m["variants"]}
  budgets = [b["budget_gib"] for b in variants["plain"]["budgets"]]
  head = ("| gradient caching | remat | " + " | ".join(f"largest pool at {b:g} GiB" for b in budgets)
          + " | memory per pair | step time | vs plain step |")
  lines = [head, "|" + "---|" * (5 + len(budgets))]
  plain = {b["budget_gib"]: b["batch"] for b in variants["plain"]["budgets"]}
  for name, (cache, remat) in _POOL_NAMES.items():
    v = variants[name]
    cells = []
    for b in v["budgets"]:
      mark = "" if b["compiled"] else " (predicted)"
      times = f", {b['batch'] / plain[b['budget_gib']]:.0f}x" if name != "plain" else ""
      cells.append(f"{b['batch']:,}{mark}{times}")
    slope = v["budgets"][0]["bytes_per_row"]
    per_row = _gib(slope) if slope >= 10 * 2**20 else f"{slope / 2**20:.2f} MiB"
    sec = t["seconds"][name]
    cache_cell = f"{cache} ({m['micro_batch_size']} rows)" if cache == "on" else cache
    lines.append(f"| {cache_cell} | {remat} | " + " | ".join(cells) + f" | {per_row} | {_s(sec['median'])} | "
                 f"{t['ratio'][name]:.2f}x |")
  out = "\n".join(lines) + "\n\n"
  out += (f"BERT-base in the VinVL shape (35 caption tokens; 35 tag tokens + 70 regions of 2054-d), {m['layers']} "
          f"layer{'s' if m['layers'] > 1 else ''}, one device, float32, dropout 0.1, the gathered InfoNCE chunked by 256 rows, AdamW + clipping, the "
          "state donated; pool = global batch (no composed negatives). Memory = XLA's plan of the compiled train "
          "step (`compiled.memory_analysis()`: arguments + outputs - donated aliases + temporaries), found from "
          "two compiled probes per variant (the plan is affine in the batch) and the predicted batch compiled to "
          "check it fits; 'memory per pair' is the line's slope. Step times: medians of "
          f"{t['seconds']['plain']['n']} interleaved steps at batch {t['batch_size']} with BERT-base widths and "
          f"{t['layers']} layer{'s' if t['layers'] > 1 else ''} (gradient caching: {t['micro_batch_size']}-row micro-batches), as ratios to the "
          f"plain step. Both run with `XLA_FLAGS={p.get('xla_flags', '')}`: XLA's CPU pipeline otherwise "
          "expands the barriers that keep a rematerialised forward apart and CSE merges it back, so remat "
          "would save nothing on CPU. With gradient caching the batch's own region features (575 KB a pair) "
          "dominate the footprint.\n")
  gc = {b["budget_gib"]: b["batch"] for b in variants["grad_cache_remat"]["budgets"]}
  first = budgets[0]
  ratio = gc[first] / plain[first]
  out += _goal(ratio >= 8, f"gradient caching + remat reach a {gc[first]:,}-pair pool at {first:g} GiB, "
               f"{ratio:.0f}x the plain step's {plain[first]:,} (target >= 8x)") + "\n"
  return out


def render(r: dict[str, Any]) -> str:
  mins = r["total_seconds"] / 60
  head = [
      "# Benchmarks",
      "",
      f"Generated by `{r.get('command', 'python benchmarks/run.py').strip()}` on {r['started']} "
      f"({mins:.1f} min). Medians of repeated runs; two implementations compared in one process, "
      "interleaved, as a ratio. The machine is shared: absolute times vary from run to run, ratios less.",
  ]
  for key, cmd in r.get("merged", {}).items():
    where = r.get("merged_machine", {}).get(key)
    head.append(f"\nTable `{key}` comes from a separate run of `{cmd.strip()}` (merged with `--merge_json`)"
                + (f", on {where}." if where else "."))
  if r["quick"]:
    head.append("\n**Quick run** (smaller sizes, fewer repeats): a smoke test of the harness, not figures to quote.")
  sections = [("Machine" + (" (of the base run; merged tables name theirs above)" if r.get("merged") else ""),
               machine(r))]
  titles = {"peaks": "Matmul peaks (same run)", "train_step": "1. Training step: BERT-base, VinVL shape",
            "ablations": "1b. Where the step's time goes (choices measured)",
            "contrastive": "2. Contrastive loss: memory and time vs pool size",
            "search": "3. Gallery search: top-10 for 1000 queries",
            "encoder": "4. Encoder throughput (gallery embedding)",
            "pool": "5. Contrastive pool vs memory: gradient caching and rematerialisation",
            "pipeline": "6. Input pipeline: pairs per second per CPU core, prepared data -> device batch",
            "accelerator": "7. The accelerator path: train-step MFU, encoder, 1M search, demo",
            "modes": "8. Retrieval modes: recall, queries per second, bytes per gallery item"}
  # A merged table is judged by the load of the run that measured it.
  load, cores = r.get("merged_load", {}).get("train_step",
                                             [r["machine"].get("load_average"), r["machine"].get("cores")])
  renderers = {"peaks": peaks, "train_step": lambda t: train_step(t, (load or [None])[0], cores), "ablations": ablations, "contrastive": contrastive,
               "search": search, "encoder": encoder, "pool": pool, "pipeline": pipeline,
               "accelerator": accelerator,
               "modes": modes}
  for key, title in titles.items():
    if key in r:
      sections.append((f"{title} ({r['durations'][key]:.0f} s)", renderers[key](r[key])))
  body = "\n".join(head) + "\n\n" + "\n".join(f"## {t}\n\n{s}" for t, s in sections)
  return body
