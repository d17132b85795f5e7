"""A DVC pipeline for transfer learning on images: CNN codes once, many cheap heads."""

from pipeline.project.stage import quiet_backend

__version__ = "0.1.0"

quiet_backend()  # before any module of the package imports Keras and with it TensorFlow
