"""FramePack: HunyuanVideo-based packed I2V model (sections with compressed history)."""
