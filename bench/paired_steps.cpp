// One revision's steps for bench_paired: d_in = d_out = d, N tokens, rank r.
// bench/ab.sh compiles this file twice, against two revisions' headers and
// bench/workload.hpp, with LORA_PAIRED_SIDE = a and b: the macro renames the
// library's namespace (lora -> lora_side_a) so that both revisions live in one
// program, and names this revision's factory lora_paired_steps_a. Without it,
// the factory is lora_paired_steps and the namespace lora, as users see it.
#include <memory>

#include "paired.hpp"

#if defined(LORA_PAIRED_SIDE)
#define LORA_PAIRED_JOIN2(x, y) x##y
#define LORA_PAIRED_JOIN(x, y) LORA_PAIRED_JOIN2(x, y)
#define lora LORA_PAIRED_JOIN(lora_side_, LORA_PAIRED_SIDE)
#define LORA_PAIRED_STEPS LORA_PAIRED_JOIN(lora_paired_steps_, LORA_PAIRED_SIDE)
#else
#define LORA_PAIRED_STEPS lora_paired_steps
#endif

#include <workload.hpp>  // the revision's, found on the include path (see bench/CMakeLists.txt)

// Without `with_floor`, Steps::floor is empty and no FrozenGemms is built
// (bench_ab times one floor, side A's).
paired::Steps LORA_PAIRED_STEPS(std::int64_t d, std::int64_t n, int r, bool with_floor) {
  using lora::bench::Shape;
  auto lora_work = std::make_shared<lora::bench::LoraWorkload>(Shape{d, n, r, 0.0});
  auto dropout_work = std::make_shared<lora::bench::LoraWorkload>(Shape{d, n, r, 0.1});
  paired::Steps steps{{}, [lora_work] { lora_work->step(); }, [dropout_work] { dropout_work->step(); }};
  if (with_floor) {
    auto floor_work = std::make_shared<lora::bench::FrozenGemms>(Shape{d, n, 0, 0.0});
    steps.floor = [floor_work] { floor_work->step(); };
  }
  return steps;
}
