"""Stage 1: the frozen backbone once over every image, each requested layer reduced and cached
(reductions, extractor, forward pass, precision, stream, store, engines)."""
