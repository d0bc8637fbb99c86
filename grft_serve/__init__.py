"""grft-serve: serve many GRFT fine-tuned tasks from one frozen backbone.

Core pieces: :mod:`grft_serve.core.rowop` (the row op shared with training), :mod:`grft_serve.core.package`
(task packages), :mod:`grft_serve.engine` (the serving engine), :mod:`grft_serve.app` (Ray Serve).
"""
from importlib.metadata import PackageNotFoundError, version

try:  # one version string: the installed distribution's (pyproject.toml)
    __version__ = version("grft-serve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
