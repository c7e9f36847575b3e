#pragma once

#include <ATen/core/Tensor.h>

namespace gradbridge {

// Calls gradbridge::bridge through the dispatcher, so autograd, Python modes and
// tensor subclasses see it like any other operator.
at::Tensor bridge(const at::Tensor& t);

} // namespace gradbridge
