"""Training-time data. What the rest of the project uses:

- `binidx`: BinidxReader, BinidxWriter, open_binidx (the official .bin/.idx layout)
- `sampler`: magic_prime, window_start (RWKV-LM's sample order)
- `datamodule`: RWKVDataModule (Lightning batches, exact resume)

Nothing is imported here, so data preparation can use `binidx` without loading Lightning.
"""
