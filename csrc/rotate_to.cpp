// gradbridge::rotate_to(x, q): the rotation trick's backward (RotateToBackward)
// and its autograd kernel. The forward is bridge.cpp's alias of q.

#include <ATen/ops/linalg_vector_norm.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include "internal.h"
#include "rules.h"

namespace gradbridge {
namespace {

// vector-quantize-pytorch's clamp (safe_div's and l2norm's default), on |x|, |q| and |u + w|.
constexpr double kEps = 1e-6;

at::Tensor row_norm(const at::Tensor& t) {
  const int64_t last = -1;
  return at::linalg_vector_norm(t, 2, at::IntArrayRef(last), /*keepdim=*/true);
}

// NOTE [The rotation trick's gradient]
// Per row (the last dimension), with e = x's row and vector-quantize-pytorch's clamps:
//   u = e / max(|e|, eps), w = q / max(|q|, eps), r = (u + w) / max(|u + w|, eps),
//   lam = |q| / max(|e|, eps), grad_e = lam (g - 2 r (r.g) + 2 u (w.g))
// (Fifty et al., arXiv 2410.06424: lam R e = q with R = I - 2 r r^T + 2 w u^T, held
// constant, so grad_e = lam R^T g). With s = u + w it is computed without
// forming r or w: r (r.g) = s (s.g) / max(|s|, eps)^2 and u (w.g) =
// e (q.g) / (max(|e|, eps) max(|q|, eps)), the same algebra everywhere, the
// clamped (degenerate) rows included, so that it is the library's gradient at
// every row: e = 0 gives (|q| / eps)(g - 2 w (w.g)), q = 0 gives 0, an exact
// antipode (s = 0) lam (g - 2 u (u.g)). Half types compute in float32 (the
// wider of x's, q's and grad's dtypes and float32), and the result has x's dtype.
at::Tensor rotated_gradient(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& q) {
  const auto acc = at::promote_types(
      at::kFloat, at::promote_types(at::promote_types(x.scalar_type(), q.scalar_type()), grad.scalar_type()));
  const auto e = x.to(acc), t = q.to(acc), g = grad.to(acc);
  const auto norm_e = row_norm(e).clamp_min(kEps);
  const auto norm_q = row_norm(t);
  const auto lam = norm_q.div(norm_e);
  const auto norm_q_clamped = norm_q.clamp_min(kEps);
  const auto s = e.div(norm_e).add_(t.div(norm_q_clamped));
  const auto norm_s = row_norm(s).clamp_min(kEps);
  const auto coef_s = s.mul(g).sum(-1, /*keepdim=*/true).div_(norm_s.square()).mul_(lam).mul_(-2);
  const auto coef_e = t.mul(g).sum(-1, /*keepdim=*/true).div_(norm_q_clamped.mul(norm_e)).mul_(lam).mul_(2);
  // NB: addcmul, not addcmul_: vmap (torch.func) has a batching rule only for the former.
  return g.mul(lam).addcmul(s, coef_s).addcmul(e, coef_e).to(x.scalar_type());
}

#if GRADBRIDGE_LIFTS_BACKWARDS
// What compiled autograd's graph calls for RotateToBackward (NOTE [Compiled
// autograd] in autograd.cpp): the gradient, and the saved x and q, packed.
constexpr const char* kLiftedName = "gradbridge_RotateToBackward";

torch::autograd::variable_list rotated_gradient_functional(
    const torch::autograd::variable_list& grads, const torch::dynamo::autograd::ivalue_list& packed) {
  torch::dynamo::autograd::PackedArgs args(packed);
  const auto x = args.unpack<at::Tensor>();
  const auto q = args.unpack<at::Tensor>();
  return {grads[0].defined() ? rotated_gradient(grads[0], x, q) : at::Tensor()};
}
#endif

// Saves x and q as autograd saves any input: the backward uses the values they
// had at the forward, and an in-place change of either before the backward
// raises autograd's "modified by an inplace operation". One edge, to x: q gets
// none (autograd's None), as in the library, where q is detached.
struct RotateToBackward : public torch::autograd::Node {
  RotateToBackward(const at::Tensor& x, const at::Tensor& q) : x_(x, /*is_output=*/false), q_(q, /*is_output=*/false) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!grads[0].defined()) {
      return {at::Tensor()};
    }
    // NB: detached: lam and R are constants, so under create_graph the gradient
    // is differentiable in grad (a linear map) and in nothing else, as the library's.
    return {rotated_gradient(grads[0], x_.unpack().detach(), q_.unpack().detach())};
  }

  std::string name() const override {
    return "RotateToBackward";
  }

  void release_variables() override {
    x_.reset_data();
    q_.reset_data();
  }

  // As ScaledGradBackward's (NOTE [Compiled autograd]): no constants; x and q
  // are the traced graph's inputs; from torch 2.7 the math is one opaque call.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) GRADBRIDGE_COMPILED_ARGS_CONST override {
#if GRADBRIDGE_COLLECT_NAMES_OUTPUTS
    args.collect(x_, /*is_output=*/false);
    args.collect(q_, /*is_output=*/false);
#else
    args.collect(x_);
    args.collect(q_);
#endif
  }

  torch::autograd::variable_list apply_with_saved(
      const torch::autograd::variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(x_);
    saved.before(q_);
    auto result = traced_backward(grads, saved);
    saved.after(x_);
    saved.after(q_);
    return result;
  }

 private:
  torch::autograd::variable_list traced_backward(
      const torch::autograd::variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) {
#if GRADBRIDGE_LIFTS_BACKWARDS
    if (grads[0].defined()) {
      namespace ca = torch::dynamo::autograd;
      const auto& compiler = ca::getPyCompilerInterface();
      static const bool bound [[maybe_unused]] = [&] {
        compiler->bind_function(saved.get_py_compiler(), kLiftedName, &rotated_gradient_functional,
                                {ca::IValuePacker<at::Tensor>::packed_type(), ca::IValuePacker<at::Tensor>::packed_type()});
        return true;
      }();
      ca::PackedArgs args;
      args.pack(x_.unpack());
      args.pack(q_.unpack());
      auto metadata = ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          ca::get_input_metadata(next_edges()));
      return compiler->call_function(saved.get_py_compiler(), "apply_functional", kLiftedName, grads, args.vec(), metadata);
    }
#endif
    return apply(torch::autograd::variable_list(grads));
  }

  torch::autograd::SavedVariable x_;
  torch::autograd::SavedVariable q_;
};

// As straight_through's: the rules, then the alias of q from below autograd,
// recorded (a node that saves x and q) only when x needs a gradient.
at::Tensor rotate_to_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& q) {
  check_rotate_to(x, q);
  check_rotate_to_autograd(x, q);
  auto result = redispatch_below_autograd(rotate_to_op(), ks, x, q);
  if (!torch::autograd::compute_requires_grad(x)) {
    return attach_to_graph(q, x, std::move(result), NodePtr());
  }
  return attach_to_graph(q, x, std::move(result), make_node<RotateToBackward>(x, q));
}

} // namespace

TORCH_LIBRARY_IMPL(gradbridge, Autograd, m) {
  m.impl("rotate_to", TORCH_FN(rotate_to_autograd));
}

} // namespace gradbridge
