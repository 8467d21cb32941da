"""Prompt-injection detection: normalisation, rules, statistical model, operator hook."""

from bastion.guard._injection._detector import ModelHook, PromptInjectionDetector, Screening
from bastion.guard._injection._model import FeatureSpec, LinearModel
from bastion.guard._injection._normalise import DecodedLayer, decode_layers, skeleton

__all__ = [
    "DecodedLayer",
    "FeatureSpec",
    "LinearModel",
    "ModelHook",
    "PromptInjectionDetector",
    "Screening",
    "decode_layers",
    "skeleton",
]
