"""Non-invertible networks: dense blocks, Nystrom attention, coupling and noise nets."""
from denseflow_jax.nets.attention import NystromAttention, iterative_pinv, nystrom_kernel
from denseflow_jax.nets.coupling_nets import (ConditionalCouplingNet, ContextNet,
                                              DenseAttentionFusion, DenseFlowCouplingNet,
                                              GlowCouplingNet, NoiseNet)
from denseflow_jax.nets.dense_block import DenseBlock, DenseLayer, GatedConv1x1
from denseflow_jax.nets.layers import BatchNorm, Conv1x1, Conv2x2Stride2, Conv3x3, conv3x3
