"""Model families (pure PyTorch). One sub-package per family: `wan` (Wan 2.1), later `hunyuan`, `framepack`."""
