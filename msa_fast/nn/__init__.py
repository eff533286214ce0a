"""Drop-in ``torch.nn`` modules built on :mod:`msa_fast.ops` (contract §3)."""

from msa_fast.nn.attention import AddNorm, MultiheadAttention, StackedLinear
from msa_fast.nn.contrastive import FDCMDIEContrastiveLoss
from msa_fast.nn.dipu import CMDIE, DIPU
from msa_fast.nn.dual_gate import DualGateFusion
from msa_fast.nn.gap import GatedAttentionPooling

__all__ = ["CMDIE", "DIPU", "AddNorm", "DualGateFusion", "FDCMDIEContrastiveLoss", "GatedAttentionPooling",
           "MultiheadAttention", "StackedLinear"]
