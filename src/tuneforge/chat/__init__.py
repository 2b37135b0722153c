"""Using trained models: loading base + adapters with their template, and generating answers."""
