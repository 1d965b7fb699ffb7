"""Training-time data. What the rest of the project uses:

- `binidx`: BinidxReader, BinidxWriter, open_binidx (the official .bin/.idx layout)
- `manifest`: read_manifest, verify_shard, check_vocab (a prepared source: shards + manifest.json)
- `sources`: opening a source (manifest directory, plain binidx prefix, or a list of them)
- `sampler`: magic_prime, window_start (RWKV-LM's sample order)
- `mixture`: the deterministic source-weighted schedule
- `batch`: Batch (idx, targets, source, cu_seqlens) and its collation
- `datamodule`: RWKVDataModule (Lightning batches, exact resume, per-source validation)

Nothing is imported here, so data preparation can use `binidx` without loading Lightning.
"""
