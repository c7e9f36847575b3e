// gradbridge::bridge(t, grad_scale, attach): a zero-copy alias of t whose
// backward is zero (cut, the default), grad_scale * grad, or autograd's zero
// with the result kept in the graph.

#include "bridge.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>
#include <torch/version.h>

// torch's internal APIs drift between releases; each use says which it needs.
#define GRADBRIDGE_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))
#if GRADBRIDGE_TORCH_AT_LEAST(2, 7)
#define GRADBRIDGE_CONST_FROM_2_7 const
#else
#define GRADBRIDGE_CONST_FROM_2_7
#endif

#include <atomic>
#include <cmath>
#include <memory>
#include <type_traits>

namespace gradbridge {
namespace {

// Process-wide, like autograd's anomaly mode: set from Python (gradbridge_ext.strict).
std::atomic<bool> strict_mode{false};

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
      : attached || strict_mode.load(std::memory_order_relaxed)
      ? t.unsafeGetTensorImpl()->version_counter()
      : c10::VariableVersion(/*version=*/0);
  auto impl = t.unsafeGetTensorImpl()->shallow_copy_and_detach(
      std::move(version), /*allow_tensor_metadata_change=*/true);
  return at::Tensor(std::move(impl));
}

// The argument rules, for every entry point: a number grad_scale is finite;
// attach=None means "attached iff grad_scale != 0", and attach=False with a
// nonzero grad_scale is refused rather than silently dropping the scale.
// Returns whether the result stays in the graph.
// NB: no message streams a number. On some toolchains (seen: GCC 13.3 with
// torch 2.11.0+cu130) extension code that formats a number through an iostream
// segfaults, c10::str included (doubles and integers alike); only nan and +-inf
// reach the first message, so they are spelled out, and counts use std::to_string.
bool check_options(double grad_scale, c10::optional<bool> attach) {
  TORCH_CHECK_VALUE(
      std::isfinite(grad_scale),
      "gradbridge::bridge: grad_scale must be a finite number, got ",
      std::isnan(grad_scale) ? "nan" : grad_scale > 0 ? "inf" : "-inf");
  TORCH_CHECK_VALUE(
      attach != false || grad_scale == 0,
      "gradbridge::bridge: attach=False cuts the graph, but a nonzero grad_scale needs it; leave attach out");
  return attach.value_or(grad_scale != 0);
}

// "[2, 3]", without streaming a number (see check_options).
std::string shape_string(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

// How Python spells a layout, for error messages.
const char* layout_name(at::Layout layout) {
  switch (layout) {
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    // NB: torch 2.1 has no jagged layout (nested tensors there are strided).
#if GRADBRIDGE_TORCH_AT_LEAST(2, 2)
    case at::kJagged: return "torch.jagged";
#endif
    default: return "other than torch.strided";
  }
}

void check_defined(const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "gradbridge::bridge(t): expected a tensor, got None (an undefined tensor)");
}

// Sparse, nested, quantized and mkldnn tensors have no one strided storage for
// an alias to share; say so by name rather than failing somewhere deeper (a
// nested tensor's sizes() is an internal error).
bool is_dense(const at::Tensor& t) {
  return t.layout() == at::kStrided && !t.is_nested() && !t.is_quantized();
}

// "a nested tensor", "a tensor with layout torch.sparse_coo", ...
std::string layout_description(const at::Tensor& t) {
  return t.is_nested() ? "a nested tensor"
      : t.is_quantized() ? "a quantized tensor"
                         : std::string("a tensor with layout ") + layout_name(t.layout());
}

// Shapes broadcast from the right, so a mask of t's leading sizes ((V,) for a
// (V, D) weight, the common row mask) needs trailing ones: say how to add them.
std::string leading_mask_hint(at::IntArrayRef mask, at::IntArrayRef shape) {
  if (mask.empty() || mask.size() >= shape.size() || mask != shape.slice(0, mask.size())) {
    return "";
  }
  std::string index = "[:";
  for (size_t i = 1; i < shape.size(); ++i) {
    index += i < mask.size() ? ", :" : ", None";
  }
  return "; for a mask of its leading dimensions, add trailing ones: grad_scale" + index + "]";
}

// A grad_scale tensor is floating (or bool, a mask) and broadcasts to the
// gradient's shape without growing it: a 0-dim scale, or a mask such as
// `rows[:, None]`. Its value is read only by the backward, so a schedule can
// update it in place between steps with no host sync and no recompile. It
// always attaches. It lives on the device of the tensor it scales (`name`),
// or is a 0-dim CPU tensor, which any device's multiply reads on the host:
// a mask elsewhere would fail only in the backward, far from the mistake.
void check_scale_tensor(const char* op, const at::Tensor& grad_scale, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      grad_scale.defined(), op, ": grad_scale must be a number or a tensor, got None");
  // Before any size is read: a nested tensor has none to read.
  TORCH_CHECK_VALUE(
      is_dense(grad_scale), op, ": a grad_scale tensor must be a dense strided tensor, got ",
      layout_description(grad_scale));
  const auto shape = t.sizes();
  bool broadcasts = grad_scale.dim() <= static_cast<int64_t>(shape.size());
  for (int64_t i = 1; broadcasts && i <= grad_scale.dim(); ++i) {
    const auto size = grad_scale.size(-i);
    broadcasts = size == 1 || size == shape[shape.size() - i];
  }
  TORCH_CHECK_VALUE(
      broadcasts && (at::isFloatingType(grad_scale.scalar_type()) || grad_scale.scalar_type() == at::kBool),
      op, ": a grad_scale tensor must be floating or bool and broadcast to the shape ",
      shape_string(shape), ", got a ", shape_string(grad_scale.sizes()), " ",
      c10::toString(grad_scale.scalar_type()), " tensor", leading_mask_hint(grad_scale.sizes(), shape));
  TORCH_CHECK_VALUE(
      grad_scale.device() == t.device() || (grad_scale.dim() == 0 && grad_scale.is_cpu()),
      op, ": a grad_scale tensor must be on ", name, "'s device, ", t.device().str(),
      ", or be a 0-dim CPU tensor; got a ", shape_string(grad_scale.sizes()), " tensor on ",
      grad_scale.device().str());
}

void check_options(const at::Tensor& t, const at::Tensor& grad_scale, c10::optional<bool> attach) {
  check_scale_tensor("gradbridge::bridge", grad_scale, t, "t");
  TORCH_CHECK_VALUE(
      attach != false,
      "gradbridge::bridge: attach=False cuts the graph, but a grad_scale tensor needs it; leave attach out");
}

void check_strided(const char* call, const char* name, const at::Tensor& t, const char* instead) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      is_dense(t), call, ": ", name, " must be a dense strided tensor, so that there "
      "is one storage to alias; got ", layout_description(t), ". ", instead);
}

// bridge's t: defined (torch.ops passes None as an undefined tensor) and strided.
void check_dense(const at::Tensor& t) {
  check_defined(t);
  check_strided("gradbridge::bridge(t)", "t", t, "Use t.detach() for it.");
}

// NOTE [straight_through's rules]
// straight_through(x, q) is q's alias with x's gradient, so the two must
// describe the same elements: the same shape (the trick's broadcast result
// would be no alias of q), the same device, and both real floating or both
// complex (the gradient reaches x in x's dtype, cast by autograd's engine).
void check_straight_through(const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK_TYPE(
      x.defined() && q.defined(),
      "gradbridge::straight_through(x, q): expected two tensors, got None (an undefined tensor)");
  check_strided("gradbridge::straight_through(x, q)", "x", x, "Use x + (q - x).detach() for it.");
  check_strided("gradbridge::straight_through(x, q)", "q", q, "Use x + (q - x).detach() for it.");
  TORCH_CHECK_VALUE(
      x.sizes() == q.sizes(),
      "gradbridge::straight_through(x, q): x and q must have the same shape (no broadcasting: the "
      "result is an alias of q), got ", shape_string(x.sizes()), " and ", shape_string(q.sizes()));
  TORCH_CHECK_VALUE(
      x.device() == q.device(),
      "gradbridge::straight_through(x, q): x and q must be on the same device, got ",
      x.device().str(), " and ", q.device().str());
  const bool real = at::isFloatingType(x.scalar_type()) && at::isFloatingType(q.scalar_type());
  const bool complex = at::isComplexType(x.scalar_type()) && at::isComplexType(q.scalar_type());
  TORCH_CHECK_TYPE(
      real || complex,
      "gradbridge::straight_through(x, q): x and q must both be floating (or both complex), got ",
      c10::toString(x.scalar_type()), " and ", c10::toString(q.scalar_type()));
}

void check_straight_through(const at::Tensor& x, const at::Tensor& q, double grad_scale) {
  check_straight_through(x, q);
  TORCH_CHECK_VALUE(
      std::isfinite(grad_scale),
      "gradbridge::straight_through: grad_scale must be a finite number, got ",
      std::isnan(grad_scale) ? "nan" : grad_scale > 0 ? "inf" : "-inf");
}

void check_straight_through(const at::Tensor& x, const at::Tensor& q, const at::Tensor& grad_scale) {
  check_straight_through(x, q);
  check_scale_tensor("gradbridge::straight_through", grad_scale, x, "x");
}

// The forward is the same for every backward, and for every device: an alias
// moves no data, so one kernel serves every dense backend (see the registration).
at::Tensor bridge_kernel(const at::Tensor& t, double grad_scale, c10::optional<bool> attach) {
  check_dense(t);
  return bridge_alias(t, /*attached=*/check_options(grad_scale, attach));
}

at::Tensor bridge_tensor_kernel(
    const at::Tensor& t, const at::Tensor& grad_scale, c10::optional<bool> attach) {
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

using BridgeSignature = at::Tensor(const at::Tensor&, double, c10::optional<bool>);
using BridgeTensorSignature = at::Tensor(const at::Tensor&, const at::Tensor&, c10::optional<bool>);
using StraightThroughSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using StraightThroughTensorSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

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

// The backward of an attached result, and of straight_through's (named for
// each): grad_scale * grad, or autograd's zero
// (an undefined gradient, None in Python) when a number grad_scale is 0. With
// a number it saves nothing, so it neither keeps t alive nor checks t's
// version. A grad_scale tensor is saved as autograd saves any input: the
// backward uses the value it had at the forward, and an in-place change of it
// before the backward raises autograd's "modified by an inplace operation".
// It always multiplies (a zero tensor gives zeros): knowing it is zero would
// need a host sync. A mask (a scale tensor of more dimensions) broadcasts to
// the gradient's shape, which check_scale_tensor made sure it does not grow.
// The scale itself gets no gradient: the forward does not depend on it.
at::Tensor scaled_grad(const at::Tensor& grad, double grad_scale, const at::Tensor& scale_tensor) {
  if (!grad.defined() || (!scale_tensor.defined() && grad_scale == 0)) {
    return at::Tensor();
  }
  if (scale_tensor.defined()) {
    auto scale = scale_tensor;
    // A CPU scale is read on the host, with no device sync; any other is moved.
    if (scale.device() != grad.device() && !scale.is_cpu()) {
      scale = scale.to(grad.device());
    }
    return grad.mul(scale);
  }
  return grad_scale == 1 ? grad : grad.mul(grad_scale);
}

#if GRADBRIDGE_TORCH_AT_LEAST(2, 7)
// What compiled autograd's graph calls for ScaledGradBackward (NOTE [Compiled
// autograd]): the gradient, and the node's grad_scale and scale tensor, packed.
constexpr const char* kLiftedName = "gradbridge_ScaledGradBackward";

torch::autograd::variable_list scaled_grad_functional(
    const torch::autograd::variable_list& grads, const torch::dynamo::autograd::ivalue_list& packed) {
  torch::dynamo::autograd::PackedArgs args(packed);
  const auto grad_scale = args.unpack<double>();
  const auto scale_tensor = args.unpack<at::Tensor>();
  return {scaled_grad(grads[0], grad_scale, scale_tensor)};
}
#endif

struct ScaledGradBackward : public torch::autograd::Node {
  ScaledGradBackward(const char* name, double grad_scale) : name_(name), grad_scale(grad_scale) {}
  ScaledGradBackward(const char* name, const at::Tensor& grad_scale)
      : name_(name), grad_scale(1), scale_tensor(grad_scale, /*is_output=*/false), has_scale_tensor(true) {}

  torch::autograd::variable_list apply(
      torch::autograd::variable_list&& grads) override {
    return {scaled_grad(grads[0], grad_scale, has_scale_tensor ? scale_tensor.unpack() : at::Tensor())};
  }

  std::string name() const override {
    return name_;
  }

  void release_variables() override {
    scale_tensor.reset_data();
  }

  // NOTE [Compiled autograd]
  // Compiled autograd traces the backward pass instead of running it: it asks
  // each node for its constants (the compiled backward's cache key) and its
  // saved tensors (the traced graph's inputs), then calls apply_with_saved with
  // the saved tensors swapped for the graph's proxies. A number grad_scale is a
  // constant, as a Scalar is to torch's MulBackward1: a new value compiles the
  // backward again (a schedule that changes every step takes a 0-dim tensor,
  // which is an input). The multiply is recorded as torch records its own
  // nodes' backwards: before torch 2.7, by tracing apply()'s ATen ops; from 2.7,
  // as one opaque call of a function bound once per process, because the
  // gradients that reach a node there are placeholders of no real shape, which
  // a mask cannot broadcast against. A gradient that is none, or the same
  // tensor, needs no call: the placeholder of a call is never None.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) GRADBRIDGE_CONST_FROM_2_7 override {
    args.collect(grad_scale);
    args.collect(has_scale_tensor);
#if GRADBRIDGE_TORCH_AT_LEAST(2, 5)
    args.collect(scale_tensor, /*is_output=*/false);
#else
    args.collect(scale_tensor);
#endif
  }

  torch::autograd::variable_list apply_with_saved(
      const torch::autograd::variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(scale_tensor);
    auto result = traced_backward(grads, saved);
    saved.after(scale_tensor);
    return result;
  }

 private:
  torch::autograd::variable_list traced_backward(
      const torch::autograd::variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) {
#if GRADBRIDGE_TORCH_AT_LEAST(2, 7)
    if (grads[0].defined() && (has_scale_tensor || (grad_scale != 0 && grad_scale != 1))) {
      namespace ca = torch::dynamo::autograd;
      const auto& compiler = ca::getPyCompilerInterface();
      static const bool bound [[maybe_unused]] = [&] {
        compiler->bind_function(saved.get_py_compiler(), kLiftedName, &scaled_grad_functional,
                                {ca::IValuePacker<double>::packed_type(), ca::IValuePacker<at::Tensor>::packed_type()});
        return true;
      }();
      ca::PackedArgs args;
      args.pack(grad_scale);
      args.pack(has_scale_tensor ? scale_tensor.unpack() : at::Tensor());
      auto metadata = ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          ca::get_input_metadata(next_edges()));
      return compiler->call_function(saved.get_py_compiler(), "apply_functional", kLiftedName, grads, args.vec(), metadata);
    }
#endif
    return apply(torch::autograd::variable_list(grads));
  }

 public:
  const char* const name_;
  const double grad_scale;
  torch::autograd::SavedVariable scale_tensor;
  const bool has_scale_tensor = false;
};

// Autograd holds nodes by c10::intrusive_ptr from torch 2.13 and by
// std::shared_ptr before; Edge::function says which this torch uses.
template <class T, class... Args>
auto make_node(Args&&... args) {
  using NodePtr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<T>(new T(std::forward<Args>(args)...));
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// NB: one forward, a family of backwards. A cut (grad_scale 0, not attached)
// records nothing: the result is a fresh leaf that does not require grad, so
// there is no node to build. Otherwise the result stays in the graph: it gets
// a BridgeBackward node with an edge to t, as generated VariableType kernels
// build theirs, and shares t's version counter, so an in-place op on either is
// seen by whatever saved the other. Its backward is not a derivative of the
// forward, so forward-mode AD through it is refused rather than silently wrong.
void check_attached_forward_ad(const at::Tensor& t) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::isFwGradDefined(t),
      "gradbridge::bridge: forward-mode AD is not supported with grad_scale or "
      "attach; the cut, bridge(t), drops the tangent as detach() does.");
}

// Our kernel already shared t's version counter; a tensor subclass or mode
// that answered the op in Python (wrapper subclasses, fake tensors) made its
// own result.
void share_version_counter(const at::Tensor& t, const at::Tensor& result) {
  if (!t.is_inference()) {
    result.unsafeGetTensorImpl()->set_version_counter(
        t.unsafeGetTensorImpl()->version_counter());
  }
}

// NOTE [An attached result refuses in-place ops]
// An in-place op through an attached result would write t and rebase the
// result's history, and autograd's view+inplace logic cannot keep a backward
// that is not a view's derivative. So a recorded result is made a view of t
// created in a custom Function, exactly what a gradient reversal layer's
// `view_as` inside autograd.Function.forward returns: autograd then raises its
// "is a view and is being modified inplace" error instead of a silent write.
// NB: torch 2.3 added as_view's rev_view_func argument; the two spellings are
// told apart by which one a call with every argument spelled out accepts.
template <class AsView>
at::Tensor custom_function_view(AsView as_view, const at::Tensor& base, const at::Tensor& tensor) {
  using torch::autograd::CreationMeta;
  constexpr auto meta = CreationMeta::IN_CUSTOM_FUNCTION;
  if constexpr (std::is_invocable_v<AsView, const at::Tensor&, const at::Tensor&, bool, bool,
                                    std::nullptr_t, std::nullptr_t, CreationMeta, bool>) {
    return as_view(base, tensor, /*is_bw_differentiable=*/true, /*is_fw_differentiable=*/false,
                   /*view_func=*/nullptr, /*rev_view_func=*/nullptr, meta,
                   /*allow_tensor_metadata_change=*/true);
  } else {
    return as_view(base, tensor, /*is_bw_differentiable=*/true, /*is_fw_differentiable=*/false,
                   /*view_func=*/nullptr, meta, /*allow_tensor_metadata_change=*/true);
  }
}

// `result` aliases `base`; its gradient goes to `input` (bridge: both are t;
// straight_through: q's values, x's gradient). So it is recorded only when
// `input` needs a gradient, as the trick's result would be.
template <class Node>
at::Tensor attach_to_graph(const at::Tensor& base, const at::Tensor& input, at::Tensor result, Node node) {
  share_version_counter(base, result);
  if (!torch::autograd::compute_requires_grad(input)) {
    return result;
  }
  result = custom_function_view(
      [](auto&&... args) -> decltype(torch::autograd::as_view(std::forward<decltype(args)>(args)...)) {
        return torch::autograd::as_view(std::forward<decltype(args)>(args)...);
      },
      base, result);
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  torch::autograd::set_history(result, node);
  return result;
}

// The forward, from the keys below autograd: the same alias for every overload.
template <class Op, class... Args>
at::Tensor redispatch_below_autograd(const Op& op, c10::DispatchKeySet ks, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.redispatch(ks & c10::after_ADInplaceOrView_keyset, args...);
}

// NB: both this and the backend kernel check the options: above autograd this
// one must know whether to attach before it redispatches, and below it
// (inference mode, Python modes) the backend kernel is the first to see them.
at::Tensor bridge_autograd(
    c10::DispatchKeySet ks, const at::Tensor& t, double grad_scale, c10::optional<bool> attach) {
  const bool attached = check_options(grad_scale, attach);
  if (attached) {
    check_attached_forward_ad(t);
  }
  auto result = redispatch_below_autograd(bridge_op(), ks, t, grad_scale, attach);
  if (!attached) {
    if (strict_mode.load(std::memory_order_relaxed)) {
      share_version_counter(t, result);
    }
    return result;
  }
  return attach_to_graph(t, t, std::move(result), make_node<ScaledGradBackward>("BridgeBackward", grad_scale));
}

at::Tensor bridge_tensor_autograd(
    c10::DispatchKeySet ks, const at::Tensor& t, const at::Tensor& grad_scale,
    c10::optional<bool> attach) {
  check_options(t, grad_scale, attach);
  check_attached_forward_ad(t);
  auto result = redispatch_below_autograd(bridge_tensor_op(), ks, t, grad_scale, attach);
  return attach_to_graph(t, t, std::move(result), make_node<ScaledGradBackward>("BridgeBackward", grad_scale));
}

const char* const kInferenceQ =
    "gradbridge::straight_through(x, q): q is an inference tensor (made under torch.inference_mode()) and x "
    "requires grad, but autograd records nothing on an inference tensor's alias, so x would get no gradient; "
    "make q outside inference mode, or pass q.clone()";

// NB: an STE's backward is no derivative of its forward either, so forward-mode
// AD is refused for x and q alike.
template <class Op, class Scale>
at::Tensor straight_through_autograd(
    const Op& op, c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& q, const Scale& grad_scale) {
  check_straight_through(x, q, grad_scale);
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(q),
      "gradbridge::straight_through: forward-mode AD is not supported");
  // NB: an alias of an inference tensor is one too, and autograd records no op
  // on it: the node would be set, and every op after it would drop x's gradient.
  TORCH_CHECK(
      !q.is_inference() || !torch::autograd::compute_requires_grad(x), kInferenceQ);
  auto result = redispatch_below_autograd(op, ks, x, q, grad_scale);
  return attach_to_graph(q, x, std::move(result), make_node<ScaledGradBackward>("StraightThroughBackward", grad_scale));
}

at::Tensor straight_through_scalar_autograd(
    c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& q, double grad_scale) {
  return straight_through_autograd(straight_through_op(), ks, x, q, grad_scale);
}

at::Tensor straight_through_tensor_autograd(
    c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& q, const at::Tensor& grad_scale) {
  return straight_through_autograd(straight_through_tensor_op(), ks, x, q, grad_scale);
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

at::Tensor bridge(const at::Tensor& t, double grad_scale, c10::optional<bool> attach) {
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

at::Tensor bridge(const at::Tensor& t, const at::Tensor& grad_scale, c10::optional<bool> attach) {
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

bool set_strict(bool enabled) {
  return strict_mode.exchange(enabled);
}

bool is_strict() {
  return strict_mode.load();
}

// The schemas mark the result as an alias of t (of q), as detach's does; the
// rules between grad_scale and attach are check_options', straight_through's
// are check_straight_through's.
//
// One device-generic forward, registered as aten::alias and aten::detach are
// (CompositeExplicitAutograd): every dense backend, built in or out of tree
// (MPS, XPU, HPU, HIP through the CUDA key, PrivateUse1), and Meta get it, with
// no code of ours per device. It refuses the layouts with no one strided
// storage (sparse, quantized and mkldnn keys reach it too; nested tensors have
// keys of their own). The autograd kernel builds the family of backwards for
// any device.
TORCH_LIBRARY(gradbridge, m) {
  m.def("bridge(Tensor(a) t, float grad_scale=0., bool? attach=None) -> Tensor(a)");
  m.def("bridge.Tensor(Tensor(a) t, Tensor grad_scale, bool? attach=None) -> Tensor(a)");
  m.def("straight_through(Tensor x, Tensor(a) q, float grad_scale=1.) -> Tensor(a)");
  m.def("straight_through.Tensor(Tensor x, Tensor(a) q, Tensor grad_scale) -> Tensor(a)");
  using c10::DispatchKey;
  for (auto key : {DispatchKey::CompositeExplicitAutograd, DispatchKey::NestedTensorCPU,
                   DispatchKey::NestedTensorCUDA}) {
    m.impl("bridge", torch::dispatch(key, TORCH_FN(bridge_kernel)));
    m.impl("bridge.Tensor", torch::dispatch(key, TORCH_FN(bridge_tensor_kernel)));
    m.impl("straight_through", torch::dispatch(key, TORCH_FN(straight_through_kernel<double>)));
    m.impl("straight_through.Tensor", torch::dispatch(key, TORCH_FN(straight_through_kernel<const at::Tensor&>)));
  }
  m.impl("bridge", torch::dispatch(DispatchKey::Autograd, TORCH_FN(bridge_autograd)));
  m.impl("bridge.Tensor", torch::dispatch(DispatchKey::Autograd, TORCH_FN(bridge_tensor_autograd)));
  m.impl("straight_through", torch::dispatch(DispatchKey::Autograd, TORCH_FN(straight_through_scalar_autograd)));
  m.impl("straight_through.Tensor", torch::dispatch(DispatchKey::Autograd, TORCH_FN(straight_through_tensor_autograd)));
}

} // namespace gradbridge
