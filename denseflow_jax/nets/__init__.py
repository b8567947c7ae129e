"""Non-invertible networks: dense blocks, Nystrom attention, coupling and noise nets.

`PointwiseConv` is a plain 1x1 convolution layer; the invertible 1x1 convolution is
`denseflow_jax.bijectors.Conv1x1`.
"""
from denseflow_jax.nets.attention import NystromAttention, iterative_pinv, nystrom_kernel
from denseflow_jax.nets.coupling_nets import (ConditionalCouplingNet, ContextNet,
                                              DenseAttentionFusion, DenseFlowCouplingNet,
                                              GlowCouplingNet, NoiseNet, float32_nets)
from denseflow_jax.nets.dense_block import DenseBlock, DenseLayer, GatedConv1x1
from denseflow_jax.nets.layers import BatchNorm, Conv2x2Stride2, Conv3x3, PointwiseConv, conv3x3
