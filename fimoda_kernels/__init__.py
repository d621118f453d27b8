"""fimoda_kernels: accelerated kernels for final-model-only data attribution (FiMODA).

Public API (see README.md); ops take and return torch tensors and accept ``backend=``
("cuda", "triton", "cpu", "torch" or None for the fastest that can run).
"""
from ._dispatch import BACKENDS, FallbackWarning, available_backends
from .ekfac import EKFAC
from .experiment import StudyConfig, run_study
from .further_training import FurtherTrainingDivergedError, FurtherTrainingResult, further_train
from .grads import capture_linear, param_layout, per_sample_grads
from .hvp import HVPOperator, gn_hvp, hessian_hvp
from .inner_products import grad_dot_model, grad_dot_vectors
from .methods import METHODS, OPTIONS, Scores, attribute, attribute_scores, self_influence
from .ops.ekfac import (ekfac_eigen_correction, ekfac_eigenbases, ekfac_precondition, ekfac_scores,
                        kfac_eigenvalues, kfac_factors)
from .ops.ensemble_step import ensemble_step
from .ops.grad_dot import grad_dot, grad_dot_factored
from .ops.lissa_update import lissa_update
from .ops.philox import philox4x32
from .ops.project import kronecker_dims, project, project_linear
from .ops.projection_matrix import projection_matrix
from .projection import project_model
from .solvers import (CGBreakdownError, CGNotConvergedWarning, LiSSADivergedError, cg, extreme_eigenvalues, lissa,
                      lissa_scale_ladder)
from .tasks import CrossEntropyTask, MSETask, Task, get_task

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "FallbackWarning", "available_backends",
    "philox4x32", "projection_matrix", "project", "project_linear", "project_model", "kronecker_dims",
    "grad_dot", "grad_dot_factored", "grad_dot_model", "grad_dot_vectors",
    "METHODS", "OPTIONS", "Scores", "attribute", "attribute_scores", "self_influence",
    "per_sample_grads", "capture_linear", "param_layout",
    "Task", "MSETask", "CrossEntropyTask", "get_task",
    "gn_hvp", "hessian_hvp", "HVPOperator", "lissa_update", "lissa", "cg", "lissa_scale_ladder", "extreme_eigenvalues",
    "LiSSADivergedError", "CGNotConvergedWarning", "CGBreakdownError",
    "EKFAC", "kfac_factors", "ekfac_eigenbases", "ekfac_eigen_correction", "kfac_eigenvalues",
    "ekfac_precondition", "ekfac_scores",
    "further_train", "FurtherTrainingResult", "FurtherTrainingDivergedError", "ensemble_step",
    "StudyConfig", "run_study",
]
