"""Data for training and evaluating recall: synthetic tasks (:mod:`bmojo.data.synthetic`)."""

from bmojo.data.synthetic import *  # noqa: F403  (the package re-exports the module's public API)
from bmojo.data.synthetic import __all__  # noqa: F401
