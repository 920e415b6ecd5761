"""lsh_torch: wide layers that compute only the neurons that matter, found by LSH."""
from . import ops
from .nn import LSHLinear
from .schedules import ConstantSchedule, GrowingSchedule, RebuildSchedule

__all__ = ["LSHLinear", "ConstantSchedule", "GrowingSchedule", "RebuildSchedule", "ops"]
__version__ = "0.1.0"
