"""Models: resolve paths (local, hubs, embedded), load tokenizers and weights."""
