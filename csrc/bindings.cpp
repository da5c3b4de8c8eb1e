// The one Python module of the C++ CPU backend. TORCH_EXTENSION_NAME is set by the build
// (lvrpo_fast/backends/cpp.py): the name carries a hash of the sources and flags, so a changed
// source never loads a stale library.
#include <torch/extension.h>

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lvrpo_fast C++ CPU backend: the primitives of lvrpo_fast.backends (see its docstring)";

  auto params = pybind11::class_<lvrpo::LossParams>(m, "LossParams", "Scalar parameters of the per-token GRPO loss");
  params.def(pybind11::init<>());
  pybind11::list fields;
#define LVRPO_BIND_FIELD(type, name)                   \
  params.def_readwrite(#name, &lvrpo::LossParams::name); \
  fields.append(#name);
  LVRPO_LOSS_PARAMS(LVRPO_BIND_FIELD)
#undef LVRPO_BIND_FIELD
  m.attr("LOSS_PARAM_FIELDS") = pybind11::tuple(fields);

  m.attr("POLICY_CLIP") = static_cast<int64_t>(lvrpo::kPolicyClip);
  m.attr("POLICY_CISPO") = static_cast<int64_t>(lvrpo::kPolicyCispo);
  m.attr("POLICY_SAPO") = static_cast<int64_t>(lvrpo::kPolicySapo);
  m.attr("POLICY_VESPO") = static_cast<int64_t>(lvrpo::kPolicyVespo);
  m.attr("LOG_RATIO_CLAMP") = lvrpo::kLogRatioClamp;
  m.attr("VESPO_LOG_W_MIN") = lvrpo::kVespoLogWMin;
  m.attr("STAT_COLUMNS") = pybind11::make_tuple(
      static_cast<int64_t>(lvrpo::kStatLoss), static_cast<int64_t>(lvrpo::kStatCount),
      static_cast<int64_t>(lvrpo::kStatKl), static_cast<int64_t>(lvrpo::kStatClipLow),
      static_cast<int64_t>(lvrpo::kStatClipHigh), static_cast<int64_t>(lvrpo::kStatClipRegion),
      static_cast<int64_t>(lvrpo::kStatRatio), static_cast<int64_t>(lvrpo::kStatEntropy),
      static_cast<int64_t>(lvrpo::kStatKept), static_cast<int64_t>(lvrpo::kStatEntropyKept),
      static_cast<int64_t>(lvrpo::kStatSeqClipLow), static_cast<int64_t>(lvrpo::kStatSeqClipHigh),
      static_cast<int64_t>(lvrpo::kStatSeqWeight), static_cast<int64_t>(lvrpo::kStatWeight),
      static_cast<int64_t>(lvrpo::kNumStats));

  m.def("logits_stats", &lvrpo::logits_stats, "logits [C, V], targets [C] -> (logp, lse, entropy|None) float32 [C]",
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("temperature"),
        pybind11::arg("with_entropy"));
  m.def("logits_grad_", &lvrpo::logits_grad_, "overwrites logits [C, V] with d(loss)/d(logits)",
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("lse"), pybind11::arg("entropy"),
        pybind11::arg("grad_logp"), pybind11::arg("grad_entropy"), pybind11::arg("temperature"));
  m.def("grpo_token_loss", &lvrpo::grpo_token_loss,
        "per-sequence stats [B, NSTATS] and d(loss)/d(logp) [B, T] (or None)", pybind11::arg("logp"),
        pybind11::arg("logp_old"), pybind11::arg("logp_ref"), pybind11::arg("logp_sampling"),
        pybind11::arg("advantages"), pybind11::arg("mask"), pybind11::arg("rollout_weights"),
        pybind11::arg("entropy"), pybind11::arg("entropy_threshold"), pybind11::arg("row_scale"),
        pybind11::arg("params"), pybind11::arg("need_grad"));
  m.def("group_advantages", &lvrpo::group_advantages, "rewards [B] float32 -> advantages [B] float32",
        pybind11::arg("rewards"), pybind11::arg("group_size"), pybind11::arg("scale"), pybind11::arg("eps"),
        pybind11::arg("leave_one_out"));
  m.def("process_advantages", &lvrpo::process_advantages,
        "step_rewards [S] float32, step_ends [S] int64, step_offsets [B + 1] int64 -> advantages [B, T] float32",
        pybind11::arg("step_rewards"), pybind11::arg("step_ends"), pybind11::arg("step_offsets"),
        pybind11::arg("group_size"), pybind11::arg("seq_len"), pybind11::arg("scale"), pybind11::arg("eps"),
        pybind11::arg("leave_one_out"), pybind11::arg("outcome_advantages"), pybind11::arg("outcome_weight"));
}
