// Scoped guards that share one process-global boolean switch (lazyfast: torch's cuBLAS TF32
// flag, csrc/precision.h) among threads. Torch-free (the standard library only), so the
// invariant is unit-tested without a GPU (csrc/tests/test_shared_flag.cpp).
//
// The rule, for every guard of one SharedFlagState:
//   * the first guard (none alive) reads the switch, records that value and sets the one it
//     wants (only if it differs);
//   * a guard that wants the value the live guards hold shares it (no read, no write);
//   * a guard that wants the other value waits until every live guard is gone;
//   * a guard nested in a thread that already holds one shares the held value whatever it
//     wants (waiting there would deadlock); value() says which value it runs with;
//   * the last guard to go restores the recorded value (if the first one changed it).
// So while any guard is alive the switch has the value all live guards share, and when none
// is alive it is back to what it was before (unless code outside the guards changed it in the
// meantime: such writes are neither seen nor prevented; the last guard overwrites them). No
// fairness: a steady stream of guards wanting the held value can keep a waiter waiting.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace lazyfast {

struct SharedFlagState {
  std::mutex mu;
  std::condition_variable released;      // notified when the last guard goes
  std::vector<std::thread::id> holders;  // one entry per live guard (its thread)
  bool value = false;                    // the value the live guards share
  bool prev = false;                     // the switch before the first live guard
  bool changed = false;                  // whether the first live guard wrote the switch
};

// get: () -> bool reads the switch; set: (bool) -> void writes it. Either may throw in the
// constructor: then no state changes and the exception propagates. A throwing set during
// the restore is swallowed (a destructor must not throw).
template <typename Set>
class SharedFlagGuard {
 public:
  template <typename Get>
  SharedFlagGuard(SharedFlagState& state, bool want, Get&& get, Set set) : state_(state), set_(std::move(set)) {
    std::unique_lock<std::mutex> lock(state_.mu);
    const std::thread::id me = std::this_thread::get_id();
    const bool nested = std::find(state_.holders.begin(), state_.holders.end(), me) != state_.holders.end();
    if (!nested) state_.released.wait(lock, [&] { return state_.holders.empty() || state_.value == want; });
    if (state_.holders.empty()) {
      const bool prev = get();
      if (prev != want) set_(want);
      state_.prev = prev;
      state_.changed = prev != want;
      state_.value = want;
    }
    state_.holders.push_back(me);
    value_ = state_.value;
  }

  ~SharedFlagGuard() {
    const std::lock_guard<std::mutex> lock(state_.mu);
    auto it = std::find(state_.holders.begin(), state_.holders.end(), std::this_thread::get_id());
    if (it == state_.holders.end()) it = state_.holders.begin();  // destroyed on another thread
    state_.holders.erase(it);
    if (!state_.holders.empty()) return;
    if (state_.changed) {
      try {
        set_(state_.prev);
      } catch (...) {
      }
    }
    state_.changed = false;
    state_.released.notify_all();
  }

  SharedFlagGuard(const SharedFlagGuard&) = delete;
  SharedFlagGuard& operator=(const SharedFlagGuard&) = delete;

  // The value the switch has while this guard lives.
  bool value() const { return value_; }

 private:
  SharedFlagState& state_;
  Set set_;
  bool value_ = false;
};

}  // namespace lazyfast
