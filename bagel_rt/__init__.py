"""bagel-rt: a lean, fast inference runtime for BAGEL-7B-MoT.

    import bagel_rt
    pipe = bagel_rt.load("path/to/BAGEL-7B-MoT")
    pipe.generate("A red bagel on a white plate.", seed=0).image.save("bagel.png")
"""

from .errors import BagelError, CheckpointError, InputError, NonFiniteError, OutputError

__all__ = ["load", "Bagel", "Session", "Result", "ASPECT_PRESETS", "BagelError", "CheckpointError", "InputError",
           "NonFiniteError", "OutputError"]
__version__ = "0.1.0"
# imported on first use, so that `import bagel_rt` (and the CLI's start, before torch is imported) is instant
_LAZY = {"load": "loader", "Bagel": "pipeline", "ASPECT_PRESETS": "pipeline", "Result": "session",
         "Session": "session"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bagel_rt' has no attribute {name!r}")
