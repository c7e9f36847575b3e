#pragma once

#include <ATen/core/Tensor.h>
#include "compat.h"

namespace gradbridge {

// The gradbridge::bridge operator: a zero-copy alias of t whose backward is
// none (the default: a cut), grad_scale * grad (grad_scale != 0), or none with
// the result kept in the autograd graph (attach=true; attach unset means
// grad_scale != 0, and attach=false with a nonzero grad_scale is an error).
// Autograd, profilers, Python modes and tensor subclasses see it like any
// other operator; a cut nothing would observe goes straight to the kernel
// (see the NB in bridge.cpp).
at::Tensor bridge(const at::Tensor& t, double grad_scale = 0, optional<bool> attach = nullopt);
// The same with a grad_scale tensor, saved for the backward: floating (or
// bool), 0-dim or a mask that broadcasts to t's shape; always attached, and
// its gradient is grad_scale * grad (see ScaledGradBackward).
at::Tensor bridge(const at::Tensor& t, const at::Tensor& grad_scale, optional<bool> attach = nullopt);

// The exact straight-through estimator: an alias of q (its values, bitwise)
// whose backward sends grad_scale * grad to x and nothing to q, as
// `x + (q - x).detach()` does. x and q have the same shape and device, and are
// both floating (or both complex); grad_scale is a finite number or a floating
// (or bool) tensor that broadcasts to x's shape.
at::Tensor straight_through(const at::Tensor& x, const at::Tensor& q, double grad_scale = 1);
at::Tensor straight_through(const at::Tensor& x, const at::Tensor& q, const at::Tensor& grad_scale);

// The rotation trick (Fifty et al., arXiv 2410.06424), as vector-quantize-pytorch's
// rotate_to(src, tgt) names it: an alias of q (its values, bitwise), recorded
// when x requires grad, whose backward sends x, row by row over the last
// dimension, lam * R^T grad, with R the rotation taking x's row to q's and
// lam = |q| / |x| held constant (rotate_to.cpp), and nothing to q. x and q have
// the same shape (at least one dimension) and device and are real floating.
at::Tensor rotate_to(const at::Tensor& x, const at::Tensor& q);

// Strict mode: results share t's version counter, as detach()'s do, so
// autograd raises when t is changed in place after C saved the result.
// Process-wide. Returns the previous setting.
bool set_strict(bool enabled);
bool is_strict();

} // namespace gradbridge
