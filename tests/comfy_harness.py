"""Placeholder: the ComfyUI fixtures are being written (in-process, server, browser)."""
