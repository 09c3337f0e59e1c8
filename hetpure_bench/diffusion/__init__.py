"""The diffusion core: networks (the embedded U-Net, score_sde's DDPM++), the VP schedule, one
sampler loop (DDIM, DDPM, RePaint resampling), the reverse VP-SDE and per-image noise streams."""
