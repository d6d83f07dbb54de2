"""The paper in miniature: `job.run_demo(workdir)` trains both stages on the demo world and reports.

  settings.py   the demo's stage-1 and stage-2 training configs
  job.py        data -> stage 1 -> stage 2 -> ablations -> evaluation -> timing -> report, each stage cached
  report.py     report.md / report.json and the plots, from the saved results
"""
