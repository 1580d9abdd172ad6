"""Offline pipeline: corpora, demo world, factor fitting, gradient projection, study directories."""
