"""DETR building blocks; each can be constructed and tested on its own."""

from .backbone import Backbone, fuse_frozen_batchnorm
from .criterion import SetCriterion, build_criterion
from .detr import DETR, MLP, build_detr
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .postprocess import PostProcess
from .transformer import MultiheadAttention, Transformer

__all__ = [
    "DETR",
    "MLP",
    "Backbone",
    "HungarianMatcher",
    "MultiheadAttention",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "PostProcess",
    "SetCriterion",
    "Transformer",
    "build_criterion",
    "build_detr",
    "fuse_frozen_batchnorm",
]
