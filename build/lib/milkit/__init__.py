"""milkit: weak labels in, dense labels out, for medical images.

Slide/image/scan labels → instance labels, pixel masks and heatmaps, with the
numbers that say how far to trust them.
"""

__version__ = "0.1.0"
