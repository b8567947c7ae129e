"""Measuring the library's own functions: used by experiments/benchmark.py,
experiments/profile_components.py and experiments/ablation.py.

- `measure`: timers, the matmul peak of the process, load average and resident memory
  (one sampler thread for both), machine, device and git information, the XLA:CPU
  performance flags.
- `flops`: matmul + convolution FLOPs counted from a jaxpr, and XLA's own counts.
- `report`: the published reference (2026-12-01) in seconds and matmul units, the targets,
  the validity rule of a row (load at its start, matmul peaks before and after), the matmul
  unit and published comparison of a row, the printed table and the BENCHMARKS.md rows.
- `loop`: the training-loop row's data, config, steady step time and first-step clock.
- `measure.wait_with_rusage` / `hwm_rss_gib`: the peak memory of one child process.

`measure`, `report` and `loop` import JAX only inside the functions that need it, so a script can
read its flags and set `XLA_FLAGS` before JAX starts a backend.
"""
