"""Corpus -> tokenized binidx shards (`rwkv7-prep`; import name rwkv7_data_prep). What the rest uses:

- `prep.prepare`: inputs -> one prepared source directory (manifest.json + shards), resumable
- `sample.build_sample_corpus`: the default training corpus, built from this Python's standard library
- `cli.main`: the rwkv7-prep command line
"""
