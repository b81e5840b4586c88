"""What `scripts/train_demo_models.py` trains, per family: `wan` (VAE, umT5, T2V DiT) and `hunyuan` (VAE, LLaVA-LLaMA-3
and CLIP-L text encoders, T2V DiT), on the shared helpers of `common` (docs/demo.md)."""
