"""The package version, in a module of its own so that code inside the package can read it
without importing the package (whose lazy attributes import training)."""

__version__ = "0.1.0"
