"""lsh_torch: wide layers that compute only the neurons that matter, found by LSH."""
from . import diagnostics, distributed, ops
from .checkpoint import load_lsh_state, lsh_state
from .convert import convert, unconvert
from .losses import sparse_cross_entropy
from .nn import LSHLinear, SparseOutput
from .optim import LazyAdam, clip_grad_norm_
from .schedules import ConstantSchedule, GrowingSchedule, RebuildSchedule

__all__ = ["LSHLinear", "LazyAdam", "clip_grad_norm_", "SparseOutput", "sparse_cross_entropy", "ConstantSchedule",
           "GrowingSchedule", "RebuildSchedule", "convert", "unconvert", "lsh_state", "load_lsh_state", "diagnostics",
           "distributed", "ops"]
__version__ = "0.1.0"
