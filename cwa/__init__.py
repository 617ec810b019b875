"""cwa — Critical Weight Analysis for large language models (the library).

The library never prints and never exits: it raises :class:`cwa.errors.CwaError`
subclasses and reports progress through an injected :class:`cwa.progress.Reporter`.
Heavy dependencies (torch, transformers, datasets, mlflow, ...) are imported lazily inside
the functions that need them so that light commands start fast.
"""

__version__ = "0.1.0"
