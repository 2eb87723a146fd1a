"""fsar: few-shot action recognition on cached CLIP features."""

__version__ = "0.1.0"
