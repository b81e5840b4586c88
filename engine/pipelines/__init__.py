"""Generation pipelines: in-memory models + a request dataclass -> latents. One module per family (`wan`)."""
