"""A search run: its configuration, the judging of candidates, the funnel and the run object."""

from .claims import Cooperation
from .config import PRESETS, SearchConfig
from .judge import Progress
from .records import Batch, Candidate, Generation, Proposal
from .run import Run, RunError

__all__ = ["PRESETS", "Batch", "Candidate", "Cooperation", "Generation", "Progress", "Proposal", "Run",
           "RunError", "SearchConfig"]
