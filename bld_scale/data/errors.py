"""The one exception type for training data that cannot be used as the recipe says."""
from __future__ import annotations


class DataError(ValueError):
    """Data (or a data setting) that a run must refuse: the message names the recipe key, the file
    and the place, and says how to fix it. `launch/distill.py` prints it as one line and exits 2."""
