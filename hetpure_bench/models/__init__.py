"""Models a benchmark loads: the classifier registry, the diffusion model registry, the artifact
index with its checksum-verified downloads and cache, and RobustBench's loader compatibility."""
