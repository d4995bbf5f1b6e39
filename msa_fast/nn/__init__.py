"""Neural-network layers on top of the fused ops (``msa_fast.ops``); parameter mappings in each module."""
from .attention import CrossModalAttention, MultiSourceAttention, merge_heads, split_heads
from .bottleneck import BottleneckFusion, BottleneckFusionLevel
from .dropout import Dropout
from .expert_mixture import ExpertMixture

__all__ = ["BottleneckFusion", "BottleneckFusionLevel", "CrossModalAttention", "Dropout", "ExpertMixture",
           "MultiSourceAttention", "merge_heads", "split_heads"]
