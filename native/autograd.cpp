// Autograd of prorl::kl_reduce, in C++ (Autograd dispatch key): a formula registered from Python costs
// ~100 us of dispatch per call, more than the kernel itself at small sizes. A translation unit of its own
// because the autograd headers are slow to parse; it compiles in parallel with the others.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace prorl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using KLReduceOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// prorl::kl_reduce below the Autograd key (the CPU or CUDA kernel).
KLReduceOutputs kl_reduce_below_autograd(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("prorl::kl_reduce", "")
          .typed<KLReduceOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(logp, ref, mask);
}

class KLReduce : public torch::autograd::Function<KLReduce> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logp, const at::Tensor& ref,
                               const at::Tensor& mask) {
    auto [kl_per_seq, tokens_per_seq, kl_sum, tokens] = kl_reduce_below_autograd(logp, ref, mask);
    ctx->save_for_backward({logp, ref, mask});
    ctx->mark_non_differentiable({tokens_per_seq, tokens});
    // An output that no gradient reached arrives undefined instead of as a tensor of zeros: the usual
    // loss uses kl_sum only, and the backward op treats a missing gradient as zero without allocating one.
    ctx->set_materialize_grads(false);
    return {kl_per_seq, tokens_per_seq, kl_sum, tokens};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("prorl::kl_reduce_backward", "")
            .typed<at::Tensor(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&)>();
    const auto present = [](const at::Tensor& g) { return g.defined() ? std::optional<at::Tensor>(g) : std::nullopt; };
    if (!grads[0].defined() && !grads[2].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    // Each row's tokens feed kl_per_seq[b] and kl_sum: the op adds the two gradients per row.
    const at::Tensor grad_logp = op.call(present(grads[0]), present(grads[2]), saved[0], saved[1], saved[2]);
    // k3 depends on ref_logp - logp only: the gradient w.r.t. ref_logp is the negation.
    const at::Tensor grad_ref = ctx->needs_input_grad(1) ? -grad_logp : at::Tensor();
    return {ctx->needs_input_grad(0) ? grad_logp : at::Tensor(), grad_ref, at::Tensor()};
  }
};

KLReduceOutputs kl_reduce_autograd(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& mask) {
  if (!at::GradMode::is_enabled() || !(logp.requires_grad() || ref.requires_grad())) {
    return kl_reduce_below_autograd(logp, ref, mask);  // no graph to record: skip the Function's bookkeeping
  }
  const variable_list out = KLReduce::apply(logp, ref, mask);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace prorl

TORCH_LIBRARY_IMPL(prorl, Autograd, m) { m.impl("kl_reduce", &prorl::kl_reduce_autograd); }
