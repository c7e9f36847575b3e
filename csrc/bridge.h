#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace gradbridge {

// The gradbridge::bridge operator: a zero-copy alias of t whose backward is
// zero (the default: a cut), grad_scale * grad (grad_scale != 0), or zero with
// the result kept in the autograd graph (attach=true; attach unset means
// grad_scale != 0, and attach=false with a nonzero grad_scale is an error).
// Autograd, profilers, Python modes and tensor subclasses see it like any
// other operator; a cut nothing would observe goes straight to the kernel
// (see the NB in bridge.cpp).
at::Tensor bridge(const at::Tensor& t, double grad_scale = 0, c10::optional<bool> attach = c10::nullopt);
// The same with a 0-dim floating grad_scale tensor, saved for the backward:
// always attached, and its gradient is grad_scale * grad (see BridgeBackward).
at::Tensor bridge(const at::Tensor& t, const at::Tensor& grad_scale, c10::optional<bool> attach = c10::nullopt);

// Strict mode: results share t's version counter, as detach()'s do, so
// autograd raises when t is changed in place after C saved the result.
// Process-wide. Returns the previous setting.
bool set_strict(bool enabled);
bool is_strict();

} // namespace gradbridge
