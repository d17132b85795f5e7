"""The optional last stage: the best head as Keras layers on top of the backbone, trained by
an LP-FT recipe."""
