// The autograd kernels: one forward (the alias, from below autograd), a family
// of backwards (ScaledGradBackward), and how a result joins the graph.

#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <memory>
#include <utility>

#include "internal.h"
#include "rules.h"

namespace gradbridge {
namespace {

// A view of `base` made inside a custom Function (NOTE [An attached result
// refuses in-place ops]). 2.3: as_view takes a rev_view_func.
at::Tensor custom_function_view(const at::Tensor& base, const at::Tensor& tensor) {
  constexpr auto meta = torch::autograd::CreationMeta::IN_CUSTOM_FUNCTION;
#if GRADBRIDGE_TORCH_AT_LEAST(2, 3)
  return torch::autograd::as_view(base, tensor, /*is_bw_differentiable=*/true, /*is_fw_differentiable=*/false,
                                  /*view_func=*/nullptr, /*rev_view_func=*/nullptr, meta,
                                  /*allow_tensor_metadata_change=*/true);
#else
  return torch::autograd::as_view(base, tensor, /*is_bw_differentiable=*/true, /*is_fw_differentiable=*/false,
                                  /*view_func=*/nullptr, meta, /*allow_tensor_metadata_change=*/true);
#endif
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
    // NB: on the gradient's device, or a 0-dim CPU tensor, which any multiply
    // reads on the host (check_scale_tensor).
    return grad.mul(scale_tensor);
  }
  return grad_scale == 1 ? grad : grad.mul(grad_scale);
}

#if GRADBRIDGE_LIFTS_BACKWARDS
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
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) GRADBRIDGE_COMPILED_ARGS_CONST override {
    args.collect(grad_scale);
    args.collect(has_scale_tensor);
#if GRADBRIDGE_COLLECT_NAMES_OUTPUTS
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
#if GRADBRIDGE_LIFTS_BACKWARDS
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

// NB: both this and the backend kernel check the options: above autograd this
// one must know whether to attach before it redispatches, and below it
// (inference mode, Python modes) the backend kernel is the first to see them.
at::Tensor bridge_autograd(
    c10::DispatchKeySet ks, const at::Tensor& t, double grad_scale, optional<bool> attach) {
  const bool attached = check_options(grad_scale, attach);
  if (attached) {
    check_attached_forward_ad(t);
  }
  auto result = redispatch_below_autograd(bridge_op(), ks, t, grad_scale, attach);
  if (!attached) {
    if (strict_mode_on()) {
      share_version_counter(t, result);
    }
    return result;
  }
  return attach_to_graph(t, t, std::move(result), make_node<ScaledGradBackward>("BridgeBackward", grad_scale));
}

at::Tensor bridge_tensor_autograd(
    c10::DispatchKeySet ks, const at::Tensor& t, const at::Tensor& grad_scale,
    optional<bool> attach) {
  check_options(t, grad_scale, attach);
  check_attached_forward_ad(t);
  auto result = redispatch_below_autograd(bridge_tensor_op(), ks, t, grad_scale, attach);
  return attach_to_graph(t, t, std::move(result), make_node<ScaledGradBackward>("BridgeBackward", grad_scale));
}

template <class Op, class Scale>
at::Tensor straight_through_autograd(
    const Op& op, c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& q, const Scale& grad_scale) {
  check_straight_through(x, q, grad_scale);
  check_straight_through_autograd(x, q);
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

} // namespace

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
// `result` aliases `base`; its gradient goes to `input` (bridge: both are t;
// straight_through: q's values, x's gradient). So it is recorded only when
// `input` needs a gradient, as the trick's result would be.
at::Tensor attach_to_graph(const at::Tensor& base, const at::Tensor& input, at::Tensor result, NodePtr node) {
  share_version_counter(base, result);
  if (!torch::autograd::compute_requires_grad(input)) {
    return result;
  }
  result = custom_function_view(base, result);
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  torch::autograd::set_history(result, node);
  return result;
}

// The family of backwards, for every device: the forward is one alias below autograd.
TORCH_LIBRARY_IMPL(gradbridge, Autograd, m) {
  m.impl("bridge", TORCH_FN(bridge_autograd));
  m.impl("bridge.Tensor", TORCH_FN(bridge_tensor_autograd));
  m.impl("straight_through", TORCH_FN(straight_through_scalar_autograd));
  m.impl("straight_through.Tensor", TORCH_FN(straight_through_tensor_autograd));
}

} // namespace gradbridge
