"""lvr: the LongVideo-R1 long-video agent, rebuilt end to end.

The code lives in four layers at the repository root, installed as
``lvr.prep`` (video -> tree), ``lvr.infer`` (the navigator), ``lvr.train``
(learning) and ``lvr.cli`` (the ``lvr`` command). Imports go one way only:
prep <- infer <- train <- cli.
"""

__version__ = "0.1.0"
