#pragma once

// The operator's argument rules (rules.cpp), for every entry point and kernel.

#include <ATen/core/Tensor.h>

#include <string>

#include "compat.h"

namespace gradbridge {

// bridge's options: a number grad_scale is finite, and attach=False with a
// nonzero one is refused. Returns whether the result stays in the graph.
bool check_options(double grad_scale, optional<bool> attach);
// bridge.Tensor's: a grad_scale tensor (check_scale_tensor), which always attaches.
void check_options(const at::Tensor& t, const at::Tensor& grad_scale, optional<bool> attach);
// A grad_scale tensor: dense, floating or bool, broadcasting to t's shape,
// on t's device or 0-dim on the CPU.
void check_scale_tensor(const char* op, const at::Tensor& grad_scale, const at::Tensor& t, const char* name);

// bridge's t: defined (torch.ops passes None as an undefined tensor) and dense strided.
void check_defined(const at::Tensor& t);
void check_dense(const at::Tensor& t);
void check_strided(const char* call, const char* name, const at::Tensor& t, const char* instead);

// straight_through's x and q (NOTE [straight_through's rules]), with each kind of grad_scale.
void check_straight_through(const at::Tensor& x, const at::Tensor& q);
void check_straight_through(const at::Tensor& x, const at::Tensor& q, double grad_scale);
void check_straight_through(const at::Tensor& x, const at::Tensor& q, const at::Tensor& grad_scale);

// rotate_to's x and q (NOTE [rotate_to's rules]).
void check_rotate_to(const at::Tensor& x, const at::Tensor& q);

// What the autograd kernels refuse: forward-mode AD through a backward that is
// no derivative of the forward, and an inference q whose alias records nothing.
void check_attached_forward_ad(const at::Tensor& t);
void check_straight_through_autograd(const at::Tensor& x, const at::Tensor& q);
void check_rotate_to_autograd(const at::Tensor& x, const at::Tensor& q);

// "[2, 3]", without streaming a number (NOTE [No message streams a number]).
std::string shape_string(at::IntArrayRef shape);

} // namespace gradbridge
