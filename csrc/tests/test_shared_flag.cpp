// Unit tests of lazyfast/shared_flag.h, the arbiter of torch's process-global cuBLAS TF32 switch
// among lazyfast ops (csrc/precision.h), over a fake switch and several std::threads.
// Built and run by CMake/ctest (no torch, no GPU).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "lazyfast/shared_flag.h"

namespace {

int g_pass = 0, g_fail = 0;

void check(bool ok, const char* what) {
  if (ok) {
    ++g_pass;
  } else {
    ++g_fail;
    std::printf("FAIL %s\n", what);
  }
}

// The fake process-global switch and how often it was written.
std::atomic<bool> g_switch{false};
std::atomic<int> g_writes{0};
bool get_switch() { return g_switch.load(); }
void set_switch(bool on) {
  g_switch.store(on);
  g_writes.fetch_add(1);
}
using Guard = lazyfast::SharedFlagGuard<void (*)(bool)>;

void test_single_guard_sets_and_restores() {
  for (const bool initial : {false, true}) {
    lazyfast::SharedFlagState state;
    g_switch = initial;
    g_writes = 0;
    {
      Guard g(state, !initial, &get_switch, &set_switch);
      check(g.value() == !initial && g_switch == !initial, "single guard sets the wanted value");
    }
    check(g_switch == initial && g_writes == 2, "single guard restores the previous value");
    {
      Guard g(state, initial, &get_switch, &set_switch);
      check(g.value() == initial && g_switch == initial, "a guard wanting the current value");
    }
    check(g_switch == initial && g_writes == 2, "a guard wanting the current value never writes");
    check(state.holders.empty(), "no holder left");
  }
}

void test_nested_guards_share_the_outer_value() {
  lazyfast::SharedFlagState state;
  g_switch = false;
  g_writes = 0;
  {
    Guard outer(state, true, &get_switch, &set_switch);
    {
      Guard same(state, true, &get_switch, &set_switch);
      check(same.value() && g_switch, "nested guard wanting the same value shares it");
      Guard other(state, false, &get_switch, &set_switch);  // would deadlock if it waited
      check(other.value() && g_switch, "nested guard wanting the other value runs with the outer one");
    }
    check(g_switch, "inner guards leave the value to the outer one");
  }
  check(!g_switch && g_writes == 2, "the last guard restores; one write each way");
}

void test_other_value_waits_for_the_holders() {
  lazyfast::SharedFlagState state;
  g_switch = false;
  std::atomic<bool> a_in{false}, a_out{false}, b_saw_a_out{false}, b_value{true};
  std::thread a([&] {
    Guard g(state, true, &get_switch, &set_switch);
    a_in = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    check(g_switch, "the holder keeps its value while another guard waits");
    a_out = true;
  });
  while (!a_in) std::this_thread::yield();
  std::thread b([&] {
    Guard g(state, false, &get_switch, &set_switch);
    b_saw_a_out = a_out.load();
    b_value = g_switch.load();
  });
  a.join();
  b.join();
  check(b_saw_a_out, "a guard wanting the other value enters only after the holder left");
  check(!b_value && !g_switch, "it then runs with its value, restored afterwards");
}

void test_throwing_getter_changes_nothing() {
  lazyfast::SharedFlagState state;
  g_switch = false;
  bool threw = false;
  try {
    Guard g(state, true, [] () -> bool { throw std::runtime_error("cannot read"); }, &set_switch);
  } catch (const std::runtime_error&) {
    threw = true;
  }
  check(threw && !g_switch && state.holders.empty(), "a throwing getter propagates and changes nothing");
  {
    Guard g(state, true, &get_switch, &set_switch);
    check(g_switch, "the state is usable after a throwing getter");
  }
  check(!g_switch, "and restores");
}

// Several threads run guards wanting random values: at every moment the live guards all want
// the same value and the switch has it; at the end the switch is back to its initial value.
void test_concurrent_guards_invariant() {
  for (const bool initial : {false, true}) {
    lazyfast::SharedFlagState state;
    g_switch = initial;
    std::atomic<int> live[2] = {{0}, {0}};
    std::atomic<int> violations{0}, entered{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng(1234 + t);
        for (int it = 0; it < 2000; ++it) {
          const bool want = (rng() % 4) == 0 ? !initial : initial;  // mostly the torch value
          Guard g(state, want, &get_switch, &set_switch);
          live[want].fetch_add(1);
          entered.fetch_add(1);
          if (g.value() != want || g_switch != want || live[!want].load() != 0) violations.fetch_add(1);
          if (rng() % 8 == 0) std::this_thread::yield();
          if (g_switch != want || live[!want].load() != 0) violations.fetch_add(1);
          if (rng() % 2 == 0) {  // a nested guard shares whatever it wants
            Guard inner(state, !want, &get_switch, &set_switch);
            if (inner.value() != want || g_switch != want) violations.fetch_add(1);
          }
          live[want].fetch_sub(1);
        }
      });
    }
    for (auto& th : threads) th.join();
    check(violations == 0, "live guards always share one value and the switch has it");
    check(entered == 8 * 2000, "every guard ran (no deadlock)");
    check(g_switch == initial && state.holders.empty(), "the switch is restored after the last guard");
  }
}

}  // namespace

int main() {
  test_single_guard_sets_and_restores();
  test_nested_guards_share_the_outer_value();
  test_other_value_waits_for_the_holders();
  test_throwing_getter_changes_nothing();
  test_concurrent_guards_invariant();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
