// The CPU kernels compiled for the build's baseline ISA (the fallback set; on aarch64 this
// is already ATen's NEON Vectorized). See bn_cpu_kernels.h.
#include <ATen/Config.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
// at::parallel_for is an inline OpenMP region: compiled without -fopenmp it runs on the
// calling thread only, and these kernels lose their intra-op parallelism.
#pragma message( \
    "fused_residual: compiled without -fopenmp; the CPU kernels will run single-threaded")
#endif

#define FUSED_RESIDUAL_ISA baseline
#define FUSED_RESIDUAL_ISA_NAME "baseline"
#include "cpu/bn_kernels_impl.h"
