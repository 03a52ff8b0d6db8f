"""minisd: Stable Diffusion, built one concept at a time.

Modules follow the course: schedule (01), unet/sampling/train/metrics (02), vae (03),
text/attention (04), guidance (05), and the SD v1 presets (06).
"""

__version__ = "0.1.0"
