"""coalmine: a streaming monitor for machine-learning models in production.

``from coalmine import Monitor`` is the notebook front door (:mod:`coalmine.notebook`, which
needs pandas: ``pip install 'coalmine[notebook]'``); it is imported on first use, so that
``import coalmine`` and the worker never import pandas.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Monitor", "Results"):
        from coalmine import notebook

        notebook.require_pandas()
        return getattr(notebook, name)
    raise AttributeError(f"module 'coalmine' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "Monitor", "Results"])
