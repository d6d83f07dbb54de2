"""Regenerates BENCHMARKS.md: `python benchmarks/run.py [--quick]`.

Each table runs in its own child process (`python -m benchmarks.<table>`), so the tables do not share a
heap, a peak RSS or XLA flags. The markdown is written to a temporary sibling and renamed: an interrupted
run leaves the previous BENCHMARKS.md as it was. `--quick` (smaller models and sizes, one repeat; see
`collect`) is a smoke test of the harness and of every goal line, under 3 minutes on an idle 2-core
machine; its figures are not the ones to quote.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, report  # noqa: E402
from vldeformer_jax.io import files as fileio  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "smaller sizes and fewer repeats (under 3 minutes on an idle machine)")
flags.DEFINE_string("output", os.path.join(common.REPO, "BENCHMARKS.md"), "where to write the markdown")
flags.DEFINE_integer("contrastive_max_run", 16384,
                     "table 2: pool sizes (pairs) above this are compiled for XLA's memory plan but not run")
flags.DEFINE_string("from_json", "", "re-render the markdown from a results.json of an earlier run")
flags.DEFINE_list("merge_json", [], "results.json files whose tables replace those of --from_json (e.g. tables "
                  "re-run separately with --tables)")
flags.DEFINE_list("tables", ["peaks", "train_step", "ablations", "contrastive", "search", "encoder", "pool",
                            "pipeline", "modes"],
                  "which tables to run")
flags.DEFINE_string("modes_demo_workdir", os.path.join(common.REPO, "runs", "demo"),
                    "table `modes`: the demo workdir whose stage1/stage2 exports and data it measures")


def collect(quick: bool, tables, contrastive_max_run: int = 16384) -> dict:
  from tqdm import tqdm
  r = {"quick": quick, "machine": common.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                             time.gmtime())}
  t0 = time.perf_counter()
  # --quick is a smoke test of every table and goal line, sized to finish in under 3 minutes on an idle
  # 2-core machine: matmul peaks at 2048^3; BERT-base widths with 1 layer (training step, ablations) or 2
  # (encoder rows) instead of 12; a contrastive pool of 1K pairs run (64K compiled only, as in the full
  # run); the 100K gallery only; one repeat each; the pool table at 1 layer, its 16 GiB batch predicted only.
  jobs = {
      "peaks": ("peaks", ["--repeats", "2", "--n", "2048"] if quick else ["--repeats", "5"]),
      "train_step": ("train_step", ["--repeats", "1", "--warmup", "1", "--layers", "1"] if quick
                     else ["--repeats", "6", "--warmup", "1"]),
      "ablations": ("train_ablations", ["--repeats", "1", "--quick"] if quick else ["--repeats", "3"]),
      "contrastive": ("contrastive_memory", ["--repeats", "1" if quick else "2", "--max_run",
                                             str(min(1024, contrastive_max_run) if quick else contrastive_max_run)]
                      + (["--quick"] if quick else [])),
      "search": ("search", ["--sizes", "100000" if quick else "100000,1000000",
                            "--repeats", "1" if quick else "2"]),
      "encoder": ("encoder_throughput", ["--repeats", "1" if quick else "2"] + (["--quick"] if quick else [])),
      "pool": ("pool_memory", ["--quick"] if quick else []),
      "pipeline": ("input_pipeline", ["--num_images", "300", "--steps", "2", "--batch", "32", "--layouts",
                                      "float32, uncompressed;bfloat16, uncompressed"] if quick else []),
      # Not in the default tables: full sizes are for a GPU / TPU host (`--tables accelerator` there).
      "accelerator": ("accelerator", ["--tiny", "--demo", "none", "--repeats", "1"] if quick else []),
  }
  # modes: the demo split's modes (codes distilled on the train split) and 1M x 768 synthetic rows (50K quick).
  jobs["modes"] = ("retrieval_modes", ["--demo_workdir", FLAGS.modes_demo_workdir] + (["--quick"] if quick else []))
  for name in tqdm([t for t in jobs if t in tables], desc="benchmarks", unit="table"):
    module, args = jobs[name]
    t = time.perf_counter()
    try:
      r[name] = common.run_child(module, args)
    except Exception as e:  # noqa: BLE001 - one failing table is reported, the others still run
      r[name] = {"error": str(e)}
    r.setdefault("durations", {})[name] = time.perf_counter() - t
  r["total_seconds"] = time.perf_counter() - t0
  return r


def main(argv):
  del argv
  json_path = os.path.join(os.path.dirname(os.path.abspath(FLAGS.output)), "benchmarks", "results.json")
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      results = json.load(f)
    for path in FLAGS.merge_json:
      with open(path) as f:
        extra = json.load(f)
      for key in ("peaks", "train_step", "ablations", "contrastive", "search", "encoder", "pool", "pipeline",
                  "accelerator", "modes"):
        if key in extra:
          results[key] = extra[key]
          results.setdefault("durations", {})[key] = extra["durations"][key]
          results.setdefault("merged", {})[key] = extra.get("command", path)
          m = extra.get("machine", {})  # tables merged from another machine say which
          results.setdefault("merged_machine", {})[key] = f"{m.get('cpu', '?')} ({m.get('simd', '')}), {m.get('cores', '?')} cores"
          results.setdefault("merged_load", {})[key] = [m.get("load_average"), m.get("cores")]  # for its warnings
      results["total_seconds"] += extra["total_seconds"]
    if FLAGS.merge_json:
      common.write_json_atomic(json_path, results)
  else:
    results = collect(FLAGS.quick, FLAGS.tables, FLAGS.contrastive_max_run)
    results["command"] = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    common.write_json_atomic(json_path, results)  # first: a rendering bug must not lose the measurements
  fileio.write_text_atomic(FLAGS.output, report.render(results))
  print(f"wrote {FLAGS.output} ({results['total_seconds']:.0f} s of measurements); raw results in {json_path}")


if __name__ == "__main__":
  app.run(main)
