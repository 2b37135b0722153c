"""Merging adapters and exporting models (safetensors, Modelfile, GGUF), each export verified."""
