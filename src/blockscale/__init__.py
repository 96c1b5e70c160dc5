"""blockscale: block-grained scaling of deep neural networks for mobile and edge devices."""

__version__ = "0.1.0"
