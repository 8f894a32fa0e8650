// The LAZYFAST_* runtime knobs of the compiled extension (docs/knobs.md): the ONE place the C++
// reads the environment. The values are read once, at the first use (thread-safe), and again
// only when reload_knobs() is called (lazyfast._ext.reload_knobs(), lazyfast.testing.knobs(...));
// the ops never call std::getenv themselves, so setting a variable after the first op call
// has no effect until the next reload.
//
// Integer knobs are parsed with std::atoll and only a value > 0 counts: an empty, zero,
// negative or non-numeric value means "unset" (the default applies); trailing garbage is
// ignored ("64k" reads as 64). LAZYFAST_DRIVER_WALK counts only when it is exactly "cuda".
// Torch-free (the standard library only).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace lazyfast {

// One snapshot of the knobs. 0 (false) = unset: the op's own default applies.
struct Knobs {
  int64_t two_layer_workspace_bytes = 0;  // LAZYFAST_TWO_LAYER_WORKSPACE_BYTES (two_layer_aten.h)
  int64_t tl_rb = 0;                      // LAZYFAST_TL_RB: CPU VJP row block
  int64_t tl_mc = 0;                      // LAZYFAST_TL_MC: CPU VJP neuron chunk
  bool driver_walk_cuda = false;          // LAZYFAST_DRIVER_WALK=cuda (cpu/two_layer_cpu.cpp)
  int64_t hadamard_panel_rows = 0;        // LAZYFAST_HADAMARD_PANEL_ROWS (hadamard_gram_aten.h)
  int64_t hadamard_panel_cols = 0;        // LAZYFAST_HADAMARD_PANEL_COLS
};

// The integer knob `name`: its std::atoll value when > 0, else 0 (unset).
inline int64_t knob_env_int(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  const long long v = std::atoll(env);
  return v > 0 ? static_cast<int64_t>(v) : 0;
}

inline Knobs read_knobs_from_env() {
  Knobs k;
  k.two_layer_workspace_bytes = knob_env_int("LAZYFAST_TWO_LAYER_WORKSPACE_BYTES");
  k.tl_rb = knob_env_int("LAZYFAST_TL_RB");
  k.tl_mc = knob_env_int("LAZYFAST_TL_MC");
  const char* walk = std::getenv("LAZYFAST_DRIVER_WALK");
  k.driver_walk_cuda = walk != nullptr && std::strcmp(walk, "cuda") == 0;
  k.hadamard_panel_rows = knob_env_int("LAZYFAST_HADAMARD_PANEL_ROWS");
  k.hadamard_panel_cols = knob_env_int("LAZYFAST_HADAMARD_PANEL_COLS");
  return k;
}

namespace detail {
struct KnobStore {
  std::mutex mu;
  Knobs value = read_knobs_from_env();  // the first use reads the environment
};
// One store per process (an inline function's static: shared by every translation unit of _C).
inline KnobStore& knob_store() {
  static KnobStore store;
  return store;
}
}  // namespace detail

// The current knobs (a copy: one consistent snapshot).
inline Knobs knobs() {
  detail::KnobStore& s = detail::knob_store();
  const std::lock_guard<std::mutex> lock(s.mu);
  return s.value;
}

// Re-reads the environment (ops that start afterwards see the new values); returns them.
inline Knobs reload_knobs() {
  detail::KnobStore& s = detail::knob_store();
  const Knobs fresh = read_knobs_from_env();
  const std::lock_guard<std::mutex> lock(s.mu);
  s.value = fresh;
  return fresh;
}

// `value` when set (> 0), else `fallback`.
inline int64_t knob_or(int64_t value, int64_t fallback) { return value > 0 ? value : fallback; }

}  // namespace lazyfast
