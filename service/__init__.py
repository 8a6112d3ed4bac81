"""UGA Serve: uncertainty-guided annotation for whole-slide segmentation."""

__version__ = "0.1.0"
