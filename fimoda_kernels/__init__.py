"""fimoda_kernels: accelerated kernels for final-model-only data attribution (FiMODA).

Public API (see README.md); ops take and return torch tensors and accept ``backend=``
("cuda", "triton", "cpu", "torch" or None for the fastest that can run).
"""
from ._dispatch import BACKENDS, FallbackWarning, available_backends
from .grads import capture_linear, param_layout, per_sample_grads
from .inner_products import grad_dot_model
from .ops.grad_dot import grad_dot, grad_dot_factored
from .ops.philox import philox4x32
from .ops.project import kronecker_dims, project, project_linear
from .ops.projection_matrix import projection_matrix
from .projection import project_model
from .tasks import CrossEntropyTask, MSETask, Task, get_task
from .experiment import StudyConfig, run_study

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "FallbackWarning", "available_backends",
    "philox4x32", "projection_matrix", "project", "project_linear", "project_model", "kronecker_dims",
    "grad_dot", "grad_dot_factored", "grad_dot_model",
    "per_sample_grads", "capture_linear", "param_layout",
    "Task", "MSETask", "CrossEntropyTask", "get_task",
    "StudyConfig", "run_study",
]
