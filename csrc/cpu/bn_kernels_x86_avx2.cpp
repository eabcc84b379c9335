// The CPU kernels compiled for AVX2 + FMA + F16C, so that at::vec::Vectorized<T> is ATen's
// AVX2 specialization; used at run time only when ATen itself runs AVX2/AVX512 kernels
// (see bn_cpu_kernels.h). setup.py builds every source with baseline flags, so the ISA is
// raised here for this unit alone:
// - the headers the kernels use outside at::vec are included first, under the baseline
//   target, so their inline functions are compiled as usual;
// - then `#pragma GCC target` raises the ISA, the CPU_CAPABILITY macros select ATen's AVX2
//   Vectorized (in its own inline namespace at::vec::AVX2, as in ATen's AVX2 kernels), and
//   the __AVX__-style macros, which the pragma does not define under g++, expose the AVX
//   declarations of sleef.h that those headers reference;
// - the kernels and ATen's AVX2 Vectorized code have internal linkage or live in the AVX2
//   namespace, so the only symbols this unit shares with the others (weak inline functions
//   from the headers above) carry no AVX2 instructions; the KernelSet is constant-
//   initialized, so no AVX2 code runs when the library loads on a CPU without AVX2.
#include "cpu/bn_cpu_kernels.h"

#if defined(FUSED_RESIDUAL_HAVE_AVX2_KERNELS)

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// ATen's AVX2 headers pass __m256 to and from lambdas; GCC's note that this ABI differs
// from a non-AVX caller's is moot, since only this unit's AVX2 code calls them.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(CPU_CAPABILITY) || defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#error "bn_kernels_x86_avx2.cpp must be compiled without a CPU_CAPABILITY definition"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif

#define FUSED_RESIDUAL_ISA avx2
#define FUSED_RESIDUAL_ISA_NAME "avx2"
#include "cpu/bn_kernels_impl.h"

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FUSED_RESIDUAL_HAVE_AVX2_KERNELS
