"""Image sources, their splits, decoding, and the prepared data on disk."""
