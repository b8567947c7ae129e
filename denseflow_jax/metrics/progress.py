"""One progress line per update for long loops: done/total, rate, elapsed and ETA to the second."""
import time
from typing import Callable


def format_seconds(seconds: float) -> str:
  """1234.5 -> '20m34s'; 3725 -> '1h02m05s'; 9.2 -> '9s'."""
  seconds = int(round(max(seconds, 0.0)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  if h:
    return f'{h}h{m:02d}m{s:02d}s'
  if m:
    return f'{m}m{s:02d}s'
  return f'{s}s'


class Progress:
  """Counts `total` items of `what`; `update(n)` logs one line with the rate and the ETA."""

  def __init__(self, total: int, what: str, log: Callable[[str], None] = print,
               clock: Callable[[], float] = time.monotonic):
    self.total, self.what, self.log, self.clock = total, what, log, clock
    self.done_count, self.start = 0, clock()

  def update(self, n: int) -> None:
    self.done_count += n
    elapsed = self.clock() - self.start
    rate = self.done_count / elapsed if elapsed > 0 else float('inf')
    left = (self.total - self.done_count) / rate if rate > 0 else 0.0
    self.log(f'{self.what}: {self.done_count}/{self.total} '
             f'({100.0 * self.done_count / max(self.total, 1):.1f}%), {rate:.1f}/s, '
             f'elapsed {format_seconds(elapsed)}, ETA {format_seconds(left)}')

  def done(self) -> None:
    elapsed = self.clock() - self.start
    self.log(f'{self.what}: {self.done_count} done in {format_seconds(elapsed)}')
