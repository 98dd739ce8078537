"""instructlm: teach a pretrained language model your own instructions from a text file."""

__version__ = "0.1.0"
