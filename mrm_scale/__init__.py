"""mrm-scale: distributed Masked Record Modeling pretraining for chest radiographs."""

__version__ = "0.1.0"
