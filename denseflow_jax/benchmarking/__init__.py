"""Measuring the library's own functions: used by experiments/benchmark.py,
experiments/profile_components.py and experiments/ablation.py.

- `measure`: timers, the matmul peak of the process, load average and resident memory
  (one sampler thread for both), machine, device and git information, the XLA:CPU
  performance flags.
- `flops`: matmul + convolution FLOPs counted from a jaxpr, and XLA's own counts.
- `report`: the published PyTorch reference, the derived fractions of peak, and the rows
  that go into BENCHMARKS.md.

`measure` and `report` import JAX only inside the functions that need it, so a script can
read its flags and set `XLA_FLAGS` before JAX starts a backend.
"""
