"""Training-time data: binidx files, the magic-prime sampler, the LightningDataModule."""
from .binidx import BinidxReader, BinidxWriter
from .datamodule import RWKVDataModule

__all__ = ["BinidxReader", "BinidxWriter", "RWKVDataModule"]
