"""s2ap-lightning: score-space sharpness-aware adversarial pruning as Lightning stages."""

__version__ = "0.1.0"
