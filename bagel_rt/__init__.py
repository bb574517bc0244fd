"""bagel-rt: a lean, fast inference runtime for BAGEL-7B-MoT.

    import bagel_rt
    pipe = bagel_rt.load("path/to/BAGEL-7B-MoT")
    pipe.generate("A red bagel on a white plate.", seed=0).image.save("bagel.png")
"""

from .errors import BagelError, CheckpointError, InputError
from .loader import load
from .pipeline import ASPECT_PRESETS, Bagel
from .session import Result, Session

__all__ = ["load", "Bagel", "Session", "Result", "ASPECT_PRESETS", "BagelError", "CheckpointError", "InputError"]
__version__ = "0.1.0"
