"""grft-train: GRFT selection (SCL-gradient row/column scores) and fine-tuning into task packages."""
__version__ = "0.1.0"
