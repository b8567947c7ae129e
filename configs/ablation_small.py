"""Small-scale Table-4 ablation (experiments/ablation.py): six coupling x augmentation variants.

`python experiments/ablation.py --config configs/ablation_small.py
 --config.ablation.output_dir=/tmp/ablation_run/out`

The paper's ablation trains DenseFlow-45-6 (45 modules, 75M parameters) for 300 CIFAR-10
epochs. This config keeps the structure of that experiment (same modules, optimizer, steps,
batch and seed for every variant; test bits/dim by the importance-weighted bound) at a scale
at which all ten runs (six variants, two more seeds of rows 1 and 6) took 50 minutes of
wall time on two shared CPU cores (31 minutes of CPU time; see docs/ablation.md):

- model: blocks (2, 2, 1), modules per unit (1, 1, 2) = 6 glow-like modules in every variant,
  coupling width 16, growth 4, dense blocks of depth 3 and growth 16 (instead of 7 and 64).
  Glow coupling nets use hidden width 40, which gives the Glow variants about the same number
  of parameters as the DenseFlow ones (197k vs 194k with augmentation; see ablation.md).
- dequantization: uniform, not variational. The published dequantization flow has a
  fixed-width (64 channels, dense growth 64) coupling net with 1.2M parameters and made a
  training step about 5x slower than the whole small flow; it is the same in all six
  variants, so dropping it keeps the comparison but raises every bits/dim.
- data: the real CIFAR-10 training subset in ../shared/data (5085 images); the last 1000 are
  held out as the test set, so 4085 images train. Random flip and 4% translation as in the
  paper.
- training: adamax (lr 1e-3, betas 0.9/0.999), linear warm-up over 50 steps, batch 32,
  400 steps (about 3 epochs of the subset), the same for every run.
- evaluation: test bits/dim by the IWBO with k = 16 over the 1000 held-out images.
- seeds: every variant with `train.seed`; the rows in `ablation.repeat` are repeated with
  `ablation.num_seeds` seeds (train.seed, train.seed + 1, ...) to measure the seed spread.

Relative data paths resolve against the repository root.
"""
import ml_collections

from denseflow_jax import defaults


def get_config():
  """The small ablation: model, data, training, evaluation and the `ablation` section."""
  config = defaults.set_architecture(defaults.get_config(), 'tiny')  # blocks, modules, width, growth
  m = config.model
  m.dense_depth = 3
  m.dense_growth = 16
  m.glow_hidden = 40
  m.dequantization = 'uniform'
  # coupling / augment / noise are set per run from defaults.TABLE4 by experiments/ablation.py.

  d = config.data
  d.dataset = 'npz'
  d.train_npz = '../shared/data/cifar10_train_subset.npz'
  d.holdout = 1000                  # the last 1000 images are the test set

  t = config.train
  t.seed = 0
  t.batch_size = 32
  t.num_steps = 400                 # ~3.1 epochs of the 4085 training images
  t.warmup_steps = 50
  t.decay_rate = 0.9975             # per epoch (127 steps); negligible over a few epochs
  t.log_every = 25
  t.checkpoint_every = 100
  t.keep_checkpoints = 1
  t.eval_every = 0                  # no periodic ELBO evaluation; the IWBO runs at the end

  e = config.eval
  e.batch_size = 50
  e.iwbo_k = 16
  e.iwbo_chunk = 8
  e.num_samples = 0
  e.at_start = False

  a = config.ablation = ml_collections.ConfigDict()
  a.output_dir = '/tmp/denseflow_ablation'  # ablation.json/.md/.png and runs/<variant>_seed<s>/
  a.variants = ('glow_noaug,glow_aug,glow_aug_precond,'
                'denseflow_noaug,denseflow_aug,denseflow_aug_precond')  # rows to run (any subset)
  a.repeat = 'glow_noaug,denseflow_aug_precond'  # rows repeated over seeds (paper rows 1 and 6)
  a.num_seeds = 3                   # seeds for the repeated rows
  a.eval_seed = 1234                # seed of the IWBO noise draws (the same for every run)
  a.compilation_cache = True        # persistent XLA cache (seed repeats reuse compiled steps)
  return config
