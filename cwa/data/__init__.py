"""Calibration and evaluation text (``cwa.data.text``): loading and token blocks.

Kept light: importing this package imports neither torch nor datasets.
"""
