"""lnshift: tune only the LayerNorms of ViT foundation models, and measure the LayerNorm shift."""

__version__ = "0.1.0"
