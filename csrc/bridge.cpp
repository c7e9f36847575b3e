// gradbridge::bridge(t, grad_scale, attach), gradbridge::straight_through(x, q, grad_scale)
// and gradbridge::rotate_to(x, q): the schemas, the one device-generic forward (an
// alias), and the C++ API. The rules are rules.cpp's, the backwards autograd.cpp's
// and rotate_to.cpp's.

#include "bridge.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <atomic>

#include "internal.h"
#include "rules.h"

namespace gradbridge {
namespace {

// Process-wide, like autograd's anomaly mode: set from Python (gradbridge_ext.strict).
std::atomic<bool> strict_mode{false};

// The forward is the same for every backward, and for every device: an alias
// moves no data, so one kernel serves every dense backend (see the registration).
at::Tensor bridge_kernel(const at::Tensor& t, double grad_scale, optional<bool> attach) {
  check_dense(t);
  return bridge_alias(t, /*attached=*/check_options(grad_scale, attach));
}

at::Tensor bridge_tensor_kernel(
    const at::Tensor& t, const at::Tensor& grad_scale, optional<bool> attach) {
  check_dense(t);
  check_options(t, grad_scale, attach);
  return bridge_alias(t, /*attached=*/true);
}

// straight_through's forward is bridge's attached alias, of q.
// Scale: double, or const at::Tensor& (the .Tensor overload).
template <class Scale>
at::Tensor straight_through_kernel(const at::Tensor& x, const at::Tensor& q, Scale grad_scale) {
  check_straight_through(x, q, grad_scale);
  return bridge_alias(q, /*attached=*/true);
}

// rotate_to's forward is the same alias of q; only its backward differs (rotate_to.cpp).
at::Tensor rotate_to_kernel(const at::Tensor& x, const at::Tensor& q) {
  check_rotate_to(x, q);
  return bridge_alias(q, /*attached=*/true);
}

// NB: the dispatcher's two kernel hops and profiler check cost a large share
// of a call this cheap, enough to make bridge slower than `t.data`. When the
// keys it would dispatch on are only a CPU or CUDA backend, autograd,
// ADInplaceOrView and BackendSelect (always included; we have no kernel
// there), it would reach bridge_alias through bridge_autograd, which adds
// nothing; so call bridge_alias directly. Anything else goes through the
// dispatcher: RecordFunction observers (the profiler), tracing, autocast,
// functionalization, vmap/grad, Python modes and subclasses (fake tensors),
// conj/neg bits, meta, sparse and other layouts and backends. Two things the
// shortcut does differently, both only for observers of dispatch:
//   - kernels another library registers over ours for these keys are not
//     called (torch.ops.gradbridge.bridge always dispatches);
//   - asking for the RecordFunction callbacks draws the sample of sampled
//     observers, and the dispatcher then draws again, so an observer sampling
//     with probability p sees bridge with about p squared.
bool dispatch_reaches_bridge_alias(const at::Tensor& t) {
  static const c10::DispatchKeySet direct_keys({
      c10::DispatchKey::CPU,
      c10::DispatchKey::CUDA,
      c10::DispatchKey::AutogradCPU,
      c10::DispatchKey::AutogradCUDA,
      c10::DispatchKey::ADInplaceOrView,
      c10::DispatchKey::BackendSelect,
  });
  const auto local = c10::impl::tls_local_dispatch_key_set();
  const auto keys = (t.key_set() | local.included_) - local.excluded_;
  return direct_keys.has_all(keys) &&
      !at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION).has_value();
}

} // namespace

// NOTE [What bridge shares]
// bridge(t) is what `t.data` gives, made an operator. The result shares t's
// StorageImpl: its data, and also its buffer if either side grows the storage
// (resize_ past the end reallocates the one StorageImpl both point to, as with
// detach() or the zeros_like + set_ trick). It starts with t's sizes, strides,
// storage offset, dtype, device and conj/neg bits, and owns the rest:
//   - its TensorImpl, so resize_, set_, as_strided_, unsqueeze_ ... change the
//     result and never t;
//   - its version counter (detach() shares t's): an in-place op on one side
//     does not bump the other's _version. Inference tensors keep none at all.
//     In strict mode, and for the settings that keep the result in the graph
//     (whether or not this call records a node), it shares t's, so autograd
//     catches an in-place change of t that C saved through the result, as it
//     would with detach();
//   - no autograd meta: a leaf that does not require grad and is no view, so a
//     loss computed through it sends no gradient to t.
// shallow_copy_and_detach is virtual, so a TensorImpl subclass copies itself.
at::Tensor bridge_alias(const at::Tensor& t, bool attached) {
  auto version = t.is_inference() ? c10::VariableVersion()
      : attached || strict_mode_on()
      ? t.unsafeGetTensorImpl()->version_counter()
      : c10::VariableVersion(/*version=*/0);
  auto impl = t.unsafeGetTensorImpl()->shallow_copy_and_detach(
      std::move(version), /*allow_tensor_metadata_change=*/true);
  return at::Tensor(std::move(impl));
}

bool strict_mode_on() {
  return strict_mode.load(std::memory_order_relaxed);
}

const c10::TypedOperatorHandle<BridgeSignature>& bridge_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradbridge::bridge", "")
                             .typed<BridgeSignature>();
  return op;
}

const c10::TypedOperatorHandle<BridgeTensorSignature>& bridge_tensor_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradbridge::bridge", "Tensor")
                             .typed<BridgeTensorSignature>();
  return op;
}

const c10::TypedOperatorHandle<StraightThroughSignature>& straight_through_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradbridge::straight_through", "")
                             .typed<StraightThroughSignature>();
  return op;
}

const c10::TypedOperatorHandle<StraightThroughTensorSignature>& straight_through_tensor_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradbridge::straight_through", "Tensor")
                             .typed<StraightThroughTensorSignature>();
  return op;
}

const c10::TypedOperatorHandle<RotateToSignature>& rotate_to_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradbridge::rotate_to", "")
                             .typed<RotateToSignature>();
  return op;
}

at::Tensor bridge(const at::Tensor& t, double grad_scale, optional<bool> attach) {
  check_defined(t);
  // Dense CPU and CUDA keys imply a strided layout, so the shortcut needs no
  // layout check; an attached result needs autograd.
  if (grad_scale == 0 && attach != true && dispatch_reaches_bridge_alias(t)) {
    return bridge_alias(t, /*attached=*/false);
  }
  // Checked before dispatch too, so that tensor subclasses which answer ops in
  // Python (jagged nested tensors) are refused with the same message.
  check_dense(t);
  return bridge_op().call(t, grad_scale, attach);
}

at::Tensor bridge(const at::Tensor& t, const at::Tensor& grad_scale, optional<bool> attach) {
  check_dense(t);
  return bridge_tensor_op().call(t, grad_scale, attach);
}

at::Tensor straight_through(const at::Tensor& x, const at::Tensor& q, double grad_scale) {
  check_straight_through(x, q);
  return straight_through_op().call(x, q, grad_scale);
}

at::Tensor straight_through(const at::Tensor& x, const at::Tensor& q, const at::Tensor& grad_scale) {
  check_straight_through(x, q);
  return straight_through_tensor_op().call(x, q, grad_scale);
}

at::Tensor rotate_to(const at::Tensor& x, const at::Tensor& q) {
  check_rotate_to(x, q);
  return rotate_to_op().call(x, q);
}

bool set_strict(bool enabled) {
  return strict_mode.exchange(enabled);
}

bool is_strict() {
  return strict_mode.load();
}

// The schemas mark the result as an alias of t (of q), as detach's does; the
// rules between grad_scale and attach are check_options', straight_through's
// are check_straight_through's, rotate_to's check_rotate_to's.
//
// One device-generic forward, registered as aten::alias and aten::detach are
// (CompositeExplicitAutograd): every dense backend, built in or out of tree
// (MPS, XPU, HPU, HIP through the CUDA key, PrivateUse1), and Meta get it, with
// no code of ours per device. It refuses the layouts with no one strided
// storage (sparse, quantized and mkldnn keys reach it too; nested tensors have
// keys of their own). The autograd kernels (autograd.cpp) build the family
// of backwards for any device.
TORCH_LIBRARY(gradbridge, m) {
  m.def("bridge(Tensor(a) t, float grad_scale=0., bool? attach=None) -> Tensor(a)");
  m.def("bridge.Tensor(Tensor(a) t, Tensor grad_scale, bool? attach=None) -> Tensor(a)");
  m.def("straight_through(Tensor x, Tensor(a) q, float grad_scale=1.) -> Tensor(a)");
  m.def("straight_through.Tensor(Tensor x, Tensor(a) q, Tensor grad_scale) -> Tensor(a)");
  m.def("rotate_to(Tensor x, Tensor(a) q) -> Tensor(a)");
  using c10::DispatchKey;
  for (auto key : {DispatchKey::CompositeExplicitAutograd, DispatchKey::NestedTensorCPU,
                   DispatchKey::NestedTensorCUDA}) {
    m.impl("bridge", torch::dispatch(key, TORCH_FN(bridge_kernel)));
    m.impl("bridge.Tensor", torch::dispatch(key, TORCH_FN(bridge_tensor_kernel)));
    m.impl("straight_through", torch::dispatch(key, TORCH_FN(straight_through_kernel<double>)));
    m.impl("straight_through.Tensor", torch::dispatch(key, TORCH_FN(straight_through_kernel<const at::Tensor&>)));
    m.impl("rotate_to", torch::dispatch(key, TORCH_FN(rotate_to_kernel)));
  }
}

} // namespace gradbridge
