"""Data room: corpus sources, report cleaning, tokenizer, shard writer/verifier, synthetic corpus, loaders."""
