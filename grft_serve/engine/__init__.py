"""The serving engine (see :mod:`grft_serve.engine.engine`)."""
from .engine import BatchReport, BatchResult, Engine, TaskExistsError, TaskInfo, UnknownTaskError

__all__ = ["BatchReport", "BatchResult", "Engine", "TaskExistsError", "TaskInfo", "UnknownTaskError"]
