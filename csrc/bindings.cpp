// The one Python module of the C++ CPU backend. TORCH_EXTENSION_NAME is set by the build
// (lvrpo_fast/backends/cpp.py): the name carries a hash of the sources and flags, so a changed
// source never loads a stale library.
#include <torch/extension.h>

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lvrpo_fast C++ CPU backend: the primitives of lvrpo_fast.backends (see its docstring)";

  pybind11::class_<lvrpo::LossParams>(m, "LossParams", "Scalar options of the per-token GRPO loss")
      .def(pybind11::init<>())
      .def_readwrite("policy", &lvrpo::LossParams::policy)
      .def_readwrite("epsilon_low", &lvrpo::LossParams::epsilon_low)
      .def_readwrite("epsilon_high", &lvrpo::LossParams::epsilon_high)
      .def_readwrite("has_delta", &lvrpo::LossParams::has_delta)
      .def_readwrite("delta", &lvrpo::LossParams::delta)
      .def_readwrite("has_clip_ratio_c", &lvrpo::LossParams::has_clip_ratio_c)
      .def_readwrite("clip_ratio_c", &lvrpo::LossParams::clip_ratio_c)
      .def_readwrite("beta", &lvrpo::LossParams::beta)
      .def_readwrite("kl_estimator", &lvrpo::LossParams::kl_estimator)
      .def_readwrite("use_bias_correction_kl", &lvrpo::LossParams::use_bias_correction_kl)
      .def_readwrite("sequence_level", &lvrpo::LossParams::sequence_level)
      .def_readwrite("entropy_coef", &lvrpo::LossParams::entropy_coef)
      .def_readwrite("sapo_temperature_pos", &lvrpo::LossParams::sapo_temperature_pos)
      .def_readwrite("sapo_temperature_neg", &lvrpo::LossParams::sapo_temperature_neg);

  m.attr("POLICY_CLIP") = static_cast<int64_t>(lvrpo::kPolicyClip);
  m.attr("POLICY_CISPO") = static_cast<int64_t>(lvrpo::kPolicyCispo);
  m.attr("POLICY_SAPO") = static_cast<int64_t>(lvrpo::kPolicySapo);
  m.attr("STAT_COLUMNS") = pybind11::make_tuple(
      static_cast<int64_t>(lvrpo::kStatLoss), static_cast<int64_t>(lvrpo::kStatCount),
      static_cast<int64_t>(lvrpo::kStatKl), static_cast<int64_t>(lvrpo::kStatClipLow),
      static_cast<int64_t>(lvrpo::kStatClipHigh), static_cast<int64_t>(lvrpo::kStatClipRegion),
      static_cast<int64_t>(lvrpo::kStatRatio), static_cast<int64_t>(lvrpo::kStatEntropy),
      static_cast<int64_t>(lvrpo::kNumStats));

  m.def("logits_stats", &lvrpo::logits_stats, "logits [C, V], targets [C] -> (logp, lse, entropy|None) float32 [C]",
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("temperature"),
        pybind11::arg("with_entropy"));
  m.def("logits_grad_", &lvrpo::logits_grad_, "overwrites logits [C, V] with d(loss)/d(logits)",
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("lse"), pybind11::arg("entropy"),
        pybind11::arg("grad_logp"), pybind11::arg("grad_entropy"), pybind11::arg("temperature"));
  m.def("grpo_token_loss", &lvrpo::grpo_token_loss,
        "per-sequence stats [B, NSTATS] and d(loss)/d(logp) [B, T] (or None)", pybind11::arg("logp"),
        pybind11::arg("logp_old"), pybind11::arg("logp_ref"), pybind11::arg("advantages"), pybind11::arg("mask"),
        pybind11::arg("rollout_weights"), pybind11::arg("entropy"), pybind11::arg("row_scale"),
        pybind11::arg("params"), pybind11::arg("need_grad"));
  m.def("group_advantages", &lvrpo::group_advantages, "rewards [B] float32 -> advantages [B] float32",
        pybind11::arg("rewards"), pybind11::arg("group_size"), pybind11::arg("scale"), pybind11::arg("eps"),
        pybind11::arg("leave_one_out"));
}
