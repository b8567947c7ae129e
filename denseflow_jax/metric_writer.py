"""The training loop's one metrics path: a clu `MultiWriter` of TensorBoard and JSONL.

`create_writer(workdir)` on process 0: every `write_scalars(step, {...})` call goes to the
TensorBoard event files and `<workdir>/metrics.jsonl` (`JsonlWriter`: one JSON object
`{"step": s, "<name>": value, ...}` per call, appended at once; `artifacts.read_metrics` reads
the file back). The console gets the loop's own one-line reports instead of a line per scalar.
Other processes write nothing. Importing this module imports clu's writers, hence TensorFlow
(several seconds): only the training loop does.
"""
import json
import os
from typing import Any, Mapping, Optional

from clu import metric_writers

from denseflow_jax import artifacts


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as JSON lines in `<workdir>/metrics.jsonl`; other kinds of values are ignored.

  Each `write_scalars` call appends one line and closes the file, so a crash loses at most a
  torn last line (which `artifacts.read_metrics` skips).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, artifacts.METRICS_FILE)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    pass

  def write_images(self, step: int, images: Mapping[str, Any]):
    pass

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    pass

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]):
    pass

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    pass

  def write_hparams(self, hparams: Mapping[str, Any]):
    pass  # the run's config is in <workdir>/config.json

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str, host0: bool = True) -> metric_writers.MultiWriter:
  """TensorBoard (in a background thread, as clu's default writer) + JSONL (at once).

  `host0=False`: an empty writer (processes other than 0).
  """
  writers = []
  if host0:
    writers += [metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)),
                JsonlWriter(workdir)]
  return metric_writers.MultiWriter(writers)
