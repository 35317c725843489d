"""The run machinery: entry points, building a run from a composed config, checks, resume, DDP in sweeps."""
