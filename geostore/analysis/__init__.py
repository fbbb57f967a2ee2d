"""Analyses of a stored trajectory: pure numerical functions, separate from store I/O and from Qt."""
