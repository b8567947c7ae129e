"""Invertible building blocks: each module returns `(output, log_det)` in both directions.

`forward` maps data to latent. `to_distrax` wraps a bijector as a `distrax.Bijector` with an
explicit direction (distrax's `forward` returns the value only, and `distrax.Transformed`
needs the latent -> data direction as its `forward`).
"""
from denseflow_jax.bijectors.actnorm import ActNorm
from denseflow_jax.bijectors.augment import CrossUnitCoupling
from denseflow_jax.bijectors.base import Bijector
from denseflow_jax.bijectors.chain import Chain
from denseflow_jax.bijectors.conv1x1 import Conv1x1, LUConv1x1
from denseflow_jax.bijectors.coupling import AffineCoupling
from denseflow_jax.bijectors.dequantize import UniformDequantization, VariationalDequantization
from denseflow_jax.bijectors.distrax_adapter import to_distrax
from denseflow_jax.bijectors.elementwise import Logit, ShiftScale, Sigmoid
from denseflow_jax.bijectors.split import SqueezeAndDrop
from denseflow_jax.bijectors.squeeze import (ChannelSwap, Squeeze, Unsqueeze, squeeze2x2,
                                             unsqueeze2x2)

__all__ = ['ActNorm', 'AffineCoupling', 'Bijector', 'Chain', 'ChannelSwap', 'Conv1x1',
           'CrossUnitCoupling', 'LUConv1x1', 'Logit', 'ShiftScale', 'Sigmoid', 'Squeeze',
           'SqueezeAndDrop', 'UniformDequantization', 'Unsqueeze', 'VariationalDequantization',
           'squeeze2x2', 'to_distrax', 'unsqueeze2x2']
