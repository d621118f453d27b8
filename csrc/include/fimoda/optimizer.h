// Optimizer codes of the ensemble step (fimoda_kernels/ops/ensemble_step.py: _OPT_CODE), shared by the
// CPU and CUDA kernels.
#pragma once

namespace fimoda {

enum EnsembleOptimizer : int { kSgd = 0, kAdam = 1, kAdamW = 2 };

}  // namespace fimoda
