"""mechdistill: characterize-then-distill for reasoning over large output spaces."""

__version__ = "0.1.0"
