"""`hybridize analyze`: per-layer sensitivity scores (measured and attention-map proxies) and a plan under a budget."""

from .pipeline import AnalyzeSettings, analyze_to_folder
from .scores import FitSettings
from .select import Constraints

__all__ = ["AnalyzeSettings", "Constraints", "FitSettings", "analyze_to_folder"]
