// The operator's argument rules and their messages: the C++ statement of them.
// gradbridge_ext/_rules.py is the Python one; tests/test_rules.py triggers
// every named error through both and compares the messages.

#include "rules.h"

#include <torch/csrc/autograd/VariableTypeUtils.h>

#include <cmath>
#include <string>

namespace gradbridge {

// NOTE [No message streams a number]
// On one machine, the GPU image the project is lent (torch 2.11.0+cu130, Python
// 3.12.3, GCC 13.3), extension code that formatted a number through an iostream
// segfaulted, c10::str included (doubles and integers alike); std::to_string
// worked there, and nothing crashed on the CPU machines (GCC 12, torch 2.1 to
// 2.15). The cause was not found: the likeliest is the extension's libstdc++
// (the system's GCC 13.3) meeting torch's own, built with an older manylinux
// toolchain, in the iostream locale machinery that only number formatting
// touches. So the rule: no message streams a number. Only nan and +-inf reach
// the finite-number messages, so they are spelled out, and sizes go through
// std::to_string (shape_string). The GPU run of the suite (.ci/gpu) raises
// every message with a number in it.

// The argument rules, for every entry point: a number grad_scale is finite;
// attach=None means "attached iff grad_scale != 0", and attach=False with a
// nonzero grad_scale is refused rather than silently dropping the scale.
// Returns whether the result stays in the graph.
bool check_options(double grad_scale, optional<bool> attach) {
  TORCH_CHECK_VALUE(
      std::isfinite(grad_scale),
      "gradbridge::bridge: grad_scale must be a finite number, got ",
      std::isnan(grad_scale) ? "nan" : grad_scale > 0 ? "inf" : "-inf");
  TORCH_CHECK_VALUE(
      attach != false || grad_scale == 0,
      "gradbridge::bridge: attach=False cuts the graph, but a nonzero grad_scale needs it; leave attach out");
  return attach.value_or(grad_scale != 0);
}

// "[2, 3]", without streaming a number.
std::string shape_string(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

// How Python spells a layout, for error messages.
static const char* layout_name(at::Layout layout) {
  switch (layout) {
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    // NB: torch 2.1 has no jagged layout (nested tensors there are strided).
#if GRADBRIDGE_HAS_JAGGED
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
static bool is_dense(const at::Tensor& t) {
  return t.layout() == at::kStrided && !t.is_nested() && !t.is_quantized();
}

// "a nested tensor", "a tensor with layout torch.sparse_coo", ...
static std::string layout_description(const at::Tensor& t) {
  return t.is_nested() ? "a nested tensor"
      : t.is_quantized() ? "a quantized tensor"
                         : std::string("a tensor with layout ") + layout_name(t.layout());
}

// Shapes broadcast from the right, so a mask of t's leading sizes ((V,) for a
// (V, D) weight, the common row mask) needs trailing ones: say how to add them.
static std::string leading_mask_hint(at::IntArrayRef mask, at::IntArrayRef shape) {
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

void check_options(const at::Tensor& t, const at::Tensor& grad_scale, optional<bool> attach) {
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
// What an alias of q with x's gradient needs, for `call` ("gradbridge::op(x, q)"):
// two defined dense tensors that describe the same elements (the same shape,
// the same device).
static void check_same_elements(const char* call, const at::Tensor& x, const at::Tensor& q, const char* instead) {
  TORCH_CHECK_TYPE(x.defined() && q.defined(), call, ": expected two tensors, got None (an undefined tensor)");
  check_strided(call, "x", x, instead);
  check_strided(call, "q", q, instead);
  TORCH_CHECK_VALUE(
      x.sizes() == q.sizes(),
      call, ": x and q must have the same shape (no broadcasting: the result is an alias of q), got ",
      shape_string(x.sizes()), " and ", shape_string(q.sizes()));
  TORCH_CHECK_VALUE(
      x.device() == q.device(),
      call, ": x and q must be on the same device, got ", x.device().str(), " and ", q.device().str());
}

void check_straight_through(const at::Tensor& x, const at::Tensor& q) {
  check_same_elements("gradbridge::straight_through(x, q)", x, q, "Use x + (q - x).detach() for it.");
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

// NOTE [rotate_to's rules]
// rotate_to(x, q) is q's alias with the rotation trick's gradient to x, which
// treats each row of the last dimension as one vector: so x and q describe the
// same elements (the same shape, the same device, as straight_through's), have
// a last dimension (at least one), and are real floating (a rotation of complex
// rows is another operator). Their dtypes may differ: the backward computes in
// the wider of them and float32, and the gradient reaches x in x's dtype.
void check_rotate_to(const at::Tensor& x, const at::Tensor& q) {
  check_same_elements("gradbridge::rotate_to(x, q)", x, q, "Pass dense tensors.");
  TORCH_CHECK_TYPE(
      at::isFloatingType(x.scalar_type()) && at::isFloatingType(q.scalar_type()),
      "gradbridge::rotate_to(x, q): x and q must both be real floating (a rotation of complex rows is not "
      "supported), got ", c10::toString(x.scalar_type()), " and ", c10::toString(q.scalar_type()));
  TORCH_CHECK_VALUE(
      x.dim() > 0,
      "gradbridge::rotate_to(x, q): x and q must have at least one dimension (each row of the last is a "
      "vector), got 0-dim tensors");
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

// An inference q's alias: autograd records no op on an inference tensor's
// alias, so the node would be set and every op after it would drop x's gradient.
static void check_q_recordable(const char* op, const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK(
      !q.is_inference() || !torch::autograd::compute_requires_grad(x),
      "gradbridge::", op, "(x, q): q is an inference tensor (made under torch.inference_mode()) and x "
      "requires grad, but autograd records nothing on an inference tensor's alias, so x would get no gradient; "
      "make q outside inference mode, or pass q.clone()");
}

// NB: an STE's backward is no derivative of its forward either, so forward-mode
// AD is refused for x and q alike, and q must be recordable.
void check_straight_through_autograd(const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(q),
      "gradbridge::straight_through: forward-mode AD is not supported");
  check_q_recordable("straight_through", x, q);
}

// rotate_to's backward is no derivative of its forward either, and q must be
// recordable (its backward also saves q, which an inference tensor cannot be).
void check_rotate_to_autograd(const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(q),
      "gradbridge::rotate_to: forward-mode AD is not supported");
  check_q_recordable("rotate_to", x, q);
}

} // namespace gradbridge
