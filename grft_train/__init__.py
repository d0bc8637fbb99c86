"""grft-train: GRFT selection (SCL-gradient row/column scores) and fine-tuning into task packages."""
from grft_serve import __version__

__all__ = ["__version__"]
