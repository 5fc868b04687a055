"""Weight souping (SoupLM): streaming weighted merges of same-architecture checkpoints and their mergekit replay."""
