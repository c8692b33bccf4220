"""The science of Any-Size-Diffusion: buckets, tiling, FSTD, models, training, metrics.

No Prefect and no storage in here: plain functions and diffusers-style classes.
"""
