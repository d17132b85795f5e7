"""Cheap heads on cached features: the head registry, scikit-learn and Keras heads, fitting in
memory or streamed from HDF5, saved models."""
