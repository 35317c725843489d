"""The run machinery: entry points, building a run from a composed config, checks, resume, DDP in sweeps.

`resolvers` registers the OmegaConf resolvers that conf/ uses (imported by `run`, and by anyone who composes
conf/ without it)."""
