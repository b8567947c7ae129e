"""Reference traces of the published code, for the parity tests (`tests/test_official.py`).

The published code draws two kinds of noise per pass: the dequantizer's standard-normal base
draw `eps` `(N, 4C, H/2, W/2)` and, before unit u >= 1 of the block at top-level index T
(T = 3 + 2b for our block b), the cross-unit draw `eta` `(N, growth_rate, H_b, W_b)`, both
channels-first. `official_noise(eps, etas)` turns them into the `noise` dict of
`DenseFlow.log_prob` / `encode` (only the axes move: the squeezed channel order `4c + 2i + j`
is the same in both codes). With the same weights and the same draws, both codes compute the
same number:

    variables, buffers = import_state_dict(read_state_dict(ckpt), model_cfg)
    noise = official_noise(eps_nchw, {'transforms.3.unit1': eta_nchw, ...})
    ll = DenseFlow(model_cfg).apply(variables, x_nhwc_uint8, noise=noise)

`reference_noise` and `reference_images` read the `noise/...` entries and the images `x` of a
reference trace (`.npz`). Nothing in the converter or the training code uses this module.
"""
from typing import Dict, Mapping, Optional

import numpy as np


def _nhwc(a: np.ndarray, what: str) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim != 4:
    raise ValueError(f'{what}: expected a channels-first (N, C, H, W) array, got shape {a.shape}')
  return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def official_noise(eps_deq: Optional[np.ndarray] = None,
                   etas: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
  """Published-layout noise -> the `noise` dict of `DenseFlow.log_prob` / `encode`.

  `eps_deq`: the dequantizer's base draw `(N, 4C, H/2, W/2)`. `etas`: `{'transforms.T.unit{u}':
  (N, growth_rate, H_b, W_b)}`, the cross-unit draw before unit u of the block at top-level
  index T = 3 + 2b. Returns `{'dequantization': ..., 'block{b}_unit{u}': ...}`, channels last.
  """
  noise = {}
  if eps_deq is not None:
    noise['dequantization'] = _nhwc(eps_deq, 'eps_deq')
  for key, eta in (etas or {}).items():
    parts = key.split('.')
    if (len(parts) != 3 or parts[0] != 'transforms' or not parts[1].isdigit()
        or not parts[2].startswith('unit') or not parts[2][4:].isdigit()):
      raise ValueError(f"official_noise: key {key!r} is not of the form 'transforms.T.unit<u>'")
    t, u = int(parts[1]), int(parts[2][4:])
    if t < 3 or t % 2 == 0 or u < 1:
      raise ValueError(f'official_noise: {key!r} names no cross-unit coupling (blocks sit at odd '
                       f'T >= 3, couplings before units u >= 1)')
    noise[f'block{(t - 3) // 2}_unit{u}'] = _nhwc(eta, key)
  return noise


def reference_noise(reference: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The `noise/eps_deq` and `noise/eta/...` entries of a reference trace as our `noise` dict."""
  etas = {k[len('noise/eta/'):]: reference[k] for k in reference if k.startswith('noise/eta/')}
  return official_noise(reference['noise/eps_deq'] if 'noise/eps_deq' in reference else None,
                        etas)


def reference_images(reference: Mapping[str, np.ndarray]) -> np.ndarray:
  """The reference trace's images `x` `(N, C, H, W)` (float) as uint8 `(N, H, W, C)`."""
  x = np.asarray(reference['x'])
  if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
    raise ValueError('reference x: expected integer pixel values in [0, 255]')
  return _nhwc(x, 'x').astype(np.uint8)
