"""mmcl: one method package (RECONSTRUCTION of smwanghhh/MMCL): layers, the shared learner (agent.py), the
device replay ring (replay.py), the MSA model (model.py), the released IEMOCAP setting (iemocap.py) and the
benchmark factory (bench.py); see model.py."""
from .agent import MMCLNet
from .model import MMCL
from .replay import ReplayRing

__all__ = ["MMCL", "MMCLNet", "ReplayRing"]
