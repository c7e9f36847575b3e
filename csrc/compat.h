#pragma once

// torch's C++ APIs drift between releases, and this extension builds against
// torch 2.1 to 2.15. This header is the one place that says how: each
// difference is keyed on the first release that has it, read in that release's
// headers (and the one before it), and the matrix (.ci/torch-versions) builds
// on both sides of most of them. Each use is spelled
// GRADBRIDGE_TORCH_AT_LEAST(major, minor), here or at the line that needs it.

#include <torch/version.h>

#define GRADBRIDGE_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// 2.2: c10::optional is std::optional, and c10/util/Optional.h is deprecated.
#if GRADBRIDGE_TORCH_AT_LEAST(2, 2)
#include <optional>
namespace gradbridge {
using std::nullopt;
using std::optional;
} // namespace gradbridge
#else
#include <c10/util/Optional.h>
namespace gradbridge {
using c10::nullopt;
using c10::optional;
} // namespace gradbridge
#endif

// 2.2: the jagged layout of torch.nested (2.1's nested tensors are strided).
#define GRADBRIDGE_HAS_JAGGED GRADBRIDGE_TORCH_AT_LEAST(2, 2)

// 2.5: compiled autograd collects a saved variable with whether it is an output.
#define GRADBRIDGE_COLLECT_NAMES_OUTPUTS GRADBRIDGE_TORCH_AT_LEAST(2, 5)

// 2.7: Node::compiled_args is const, and compiled autograd can lift a backward
// into its graph as one opaque call (bind_function, call_function).
#if GRADBRIDGE_TORCH_AT_LEAST(2, 7)
#define GRADBRIDGE_COMPILED_ARGS_CONST const
#define GRADBRIDGE_LIFTS_BACKWARDS 1
#else
#define GRADBRIDGE_COMPILED_ARGS_CONST
#define GRADBRIDGE_LIFTS_BACKWARDS 0
#endif

// 2.13: at::impl::PythonTorchFunctionTLS::peek_skip_next (torch.overrides.redispatch_function).
#define GRADBRIDGE_HAS_SKIP_NEXT GRADBRIDGE_TORCH_AT_LEAST(2, 13)
