"""Applications built on kvpass's public pieces: EpiCache's episodic caches, Elastic-Cache generation, eval, tune, the
command line."""
