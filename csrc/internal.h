#pragma once

// What the kernels share across files: the alias every forward returns, the
// typed handles of the operators, strict mode's flag, and how a result joins
// the autograd graph.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/function.h>

#include <memory>
#include <utility>

#include "compat.h"

namespace gradbridge {

// NOTE [What bridge shares] (bridge.cpp): the alias of t that every forward returns.
at::Tensor bridge_alias(const at::Tensor& t, bool attached);
bool strict_mode_on();

using BridgeSignature = at::Tensor(const at::Tensor&, double, optional<bool>);
using BridgeTensorSignature = at::Tensor(const at::Tensor&, const at::Tensor&, optional<bool>);
using StraightThroughSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using StraightThroughTensorSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using RotateToSignature = at::Tensor(const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<BridgeSignature>& bridge_op();
const c10::TypedOperatorHandle<BridgeTensorSignature>& bridge_tensor_op();
const c10::TypedOperatorHandle<StraightThroughSignature>& straight_through_op();
const c10::TypedOperatorHandle<StraightThroughTensorSignature>& straight_through_tensor_op();
const c10::TypedOperatorHandle<RotateToSignature>& rotate_to_op();

// `result` (an alias of `base`) with `t`'s version counter, unless `base` is an inference tensor.
void share_version_counter(const at::Tensor& base, const at::Tensor& result);

// 2.13: autograd holds nodes by c10::intrusive_ptr (std::shared_ptr before).
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T, class... Args>
auto make_node(Args&&... args) {
#if GRADBRIDGE_TORCH_AT_LEAST(2, 13)
  return c10::make_intrusive<T>(std::forward<Args>(args)...);
#else
  return std::shared_ptr<T>(new T(std::forward<Args>(args)...));
#endif
}

// `result` aliases `base`; its gradient goes to `input` through `node`
// (autograd.cpp). Recorded only when `input` needs a gradient.
at::Tensor attach_to_graph(const at::Tensor& base, const at::Tensor& input, at::Tensor result, NodePtr node);

// The forward, from the keys below autograd: the same alias for every overload.
template <class Op, class... Args>
at::Tensor redispatch_below_autograd(const Op& op, c10::DispatchKeySet ks, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(ks & c10::after_ADInplaceOrView_keyset, args...);
}

} // namespace gradbridge
