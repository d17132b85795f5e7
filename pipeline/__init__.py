"""A DVC pipeline for transfer learning on images: CNN codes once, many cheap heads."""

__version__ = "0.1.0"
