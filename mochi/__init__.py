"""Mochi-1 in pure torch: DiT, VAE decoder, schedules, checkpoint loading, parallel attention.
Imports neither Ray nor ComfyUI."""
