// One-pass AdamW step for XLA:CPU, called through jax.ffi by optax_decoupled._kernel.
//
// For every element of every leaf (float32 θ, g, m, v, updated in place through input/output
// aliasing); `decay` is per *segment*: the leaves, taken as one sequence, are cut into
// consecutive segments of `segment_sizes` elements (one segment per leaf for a tree; one per
// original leaf inside a single packed buffer for od.FlatLayout), none crossing a leaf end.
// decay[segment] = 0: no decay term; k >= 1: the term's coefficient λ_t is scalars[14 + k]
// (λ_t itself, or λ_t·mult for od.decay_multipliers, as JAX computed it for the chain).
// The leaves start at `shard · shard_size` in that sequence of segments (`shard`, an operand:
// this device's shard of a sharded packed buffer; 0 otherwise). With `clip` set (a global-norm
// clip before the optimizer, optax.clip_by_global_norm, whose norm JAX computed):
//
//   g   = (g / ‖g‖) · max_norm   if clip  optax.clip_by_global_norm (when ‖g‖ >= max_norm)
//   g   = g + λ_t·θ   if mode 1 (L2)     optax_decoupled.add_l2_to_grad (od.adam_l2)
//   m'  = (1-b1)·g + b1·m                 optax.tree.update_moment
//   v'  = (1-b2)·(g·g) + b2·v             optax.tree.update_moment_per_elem_norm (order 2)
//   u   = (m'/bc1) / (sqrt(v'/bc2 + eps_root) + eps)     optax.scale_by_adam, bc = 1 - b**t
//         with nesterov, m'/bc1 is b1·(m'/bc1_next) + (1-b1)·(g/bc1), bc1_next = 1 - b1**(t+1)
//   u   = u + λ_t·θ   if mode 0          optax_decoupled.add_decoupled_decay (lr-coupled)
//   u   = (-η_t)·u                        optax.scale_by_learning_rate
//   u   = u - c_t·θ   if mode 2          the other couplings of od.adamw: θ shrinks by c_t
//                                         after the finished step (each term only on the
//                                         segments decay[] selects)
//   θ'  = θ + u                           optax.apply_updates
//
// θ and g may be float32 or bfloat16 (m and v are float32): a bfloat16 value is widened to
// float32 exactly, the arithmetic is float32, and θ' is rounded back to bfloat16 to nearest
// even, which is what the chain does with float32 moments (`mu_dtype=nu_dtype=jnp.float32`:
// g upcast before the moments, λθ in float32, `apply_updates` adding in float32).
//
// The operations, their order and their float32 rounding are those of the optax chain
// (no fused multiply-add: built with -ffp-contract=off), so the result equals the pure-JAX
// step to round-off. Every scalar (1-b1, bc1, -η_t, ...) is computed by JAX, in the dtype
// the chain computes it in, and passed in `scalars`.
//
// Threads: the elements of all leaves, taken as one sequence, are cut into equal parts that
// XLA's intra-op thread pool and the calling thread take in turn; each array crosses main
// memory once (28 bytes per parameter).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Scalars {
  float neg_lr, omb1, b1, omb2, b2, bc1, bc2, eps, eps_root, mode, clip, g_norm, max_norm,
      nesterov, bc1_next;
};
constexpr int64_t kNumScalars = 15;  // then one λ_t per decay index

enum class Kind : uint8_t { kF32, kBF16 };

// A run of elements of one leaf inside one segment.
struct Run {
  void* theta;
  const void* g;
  float* m;
  float* v;
  int64_t n;
  bool decay;
  float wd;  // λ_t of this segment (used when decay)
  Kind theta_kind, g_kind;
};

inline float Widen(float x) { return x; }
inline float Widen(uint16_t x) {  // bfloat16 -> float32 is exact.
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void Narrow(float x, float* out) { *out = x; }
inline void Narrow(float x, uint16_t* out) {  // float32 -> bfloat16, round to nearest even.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN.
    *out = static_cast<uint16_t>((bits >> 16) | 0x0040u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define OD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OD_CLONES
#endif

template <typename T, typename G, bool kClip, int kMode, bool kNesterov>
inline __attribute__((always_inline)) void Loop(T* __restrict theta, const G* __restrict g,
                                                float* __restrict m, float* __restrict v,
                                                const Scalars& s, float wd, int64_t lo,
                                                int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    float gi = Widen(g[i]);
    const float ti = Widen(theta[i]);
    if (kClip) gi = (gi / s.g_norm) * s.max_norm;
    if (kMode == 1) gi = gi + wd * ti;
    const float mi = s.omb1 * gi + s.b1 * m[i];
    const float vi = s.omb2 * (gi * gi) + s.b2 * v[i];
    const float m_hat = kNesterov ? s.b1 * (mi / s.bc1_next) + s.omb1 * (gi / s.bc1)
                                  : mi / s.bc1;
    const float v_hat = vi / s.bc2;
    float u = m_hat / (std::sqrt(v_hat + s.eps_root) + s.eps);
    if (kMode == 0) u = u + wd * ti;
    u = s.neg_lr * u;
    if (kMode == 2) u = u - wd * ti;
    m[i] = mi;
    v[i] = vi;
    Narrow(ti + u, &theta[i]);
  }
}

// The clip and the decay term are template arguments, not branches in the loop: the loop
// stays vectorised (a branch there stopped GCC vectorising the bfloat16 loop). Mode -1: a
// segment without decay.
template <typename T, typename G, bool kClip, bool kNesterov>
inline __attribute__((always_inline)) void Modes(T* __restrict theta, const G* __restrict g,
                                                 float* __restrict m, float* __restrict v,
                                                 const Scalars& s, int mode, float wd,
                                                 int64_t lo, int64_t hi) {
  switch (mode) {
    case 0: Loop<T, G, kClip, 0, kNesterov>(theta, g, m, v, s, wd, lo, hi); break;
    case 1: Loop<T, G, kClip, 1, kNesterov>(theta, g, m, v, s, wd, lo, hi); break;
    case 2: Loop<T, G, kClip, 2, kNesterov>(theta, g, m, v, s, wd, lo, hi); break;
    default: Loop<T, G, kClip, -1, kNesterov>(theta, g, m, v, s, wd, lo, hi); break;
  }
}

template <typename T, typename G>
inline __attribute__((always_inline)) void Body(T* __restrict theta, const G* __restrict g,
                                                float* __restrict m, float* __restrict v,
                                                const Scalars& s, bool decay, float wd,
                                                int64_t lo, int64_t hi) {
  const int mode = decay ? static_cast<int>(s.mode) : -1;
  const bool clip = s.clip != 0.0f, nesterov = s.nesterov != 0.0f;
  if (clip && nesterov) Modes<T, G, true, true>(theta, g, m, v, s, mode, wd, lo, hi);
  else if (clip) Modes<T, G, true, false>(theta, g, m, v, s, mode, wd, lo, hi);
  else if (nesterov) Modes<T, G, false, true>(theta, g, m, v, s, mode, wd, lo, hi);
  else Modes<T, G, false, false>(theta, g, m, v, s, mode, wd, lo, hi);
}

// One clone set per (θ, g) dtype pair; each inlines Body for its own instruction set.
#define OD_UPDATE(NAME, T, G)                                                             \
  OD_CLONES void NAME(void* theta, const void* g, float* m, float* v, const Scalars s,   \
                      bool decay, float wd, int64_t lo, int64_t hi) {                     \
    Body<T, G>(static_cast<T*>(theta), static_cast<const G*>(g), m, v, s, decay, wd, lo,  \
               hi);                                                                       \
  }
OD_UPDATE(UpdateF32F32, float, float)
OD_UPDATE(UpdateF32BF16, float, uint16_t)
OD_UPDATE(UpdateBF16F32, uint16_t, float)
OD_UPDATE(UpdateBF16BF16, uint16_t, uint16_t)
#undef OD_UPDATE

void UpdateRun(const Run& r, const Scalars& s, int64_t lo, int64_t hi) {
  const bool t16 = r.theta_kind == Kind::kBF16, g16 = r.g_kind == Kind::kBF16;
  auto* update = t16 ? (g16 ? UpdateBF16BF16 : UpdateBF16F32)
                     : (g16 ? UpdateF32BF16 : UpdateF32F32);
  update(r.theta, r.g, r.m, r.v, s, r.decay, r.wd, lo, hi);
}

// Shared by the calling thread and the pool tasks; kept alive by shared_ptr until the last
// task has run (a task may start after the caller has already finished all parts).
struct Work {
  std::vector<Run> runs;
  Scalars s;
  int64_t total = 0;
  int64_t parts = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void RunPart(int64_t p) {
    const int64_t lo = total * p / parts, hi = total * (p + 1) / parts;
    int64_t offset = 0;
    for (const Run& run : runs) {
      const int64_t a = std::max<int64_t>(lo - offset, 0);
      const int64_t b = std::min<int64_t>(hi - offset, run.n);
      if (a < b) UpdateRun(run, s, a, b);
      offset += run.n;
      if (offset >= hi) break;
    }
  }

  void Drain() {
    for (int64_t p = next.fetch_add(1); p < parts; p = next.fetch_add(1)) {
      RunPart(p);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Below this many elements in total, one thread (waking the pool costs more than it saves).
constexpr int64_t kMinParallel = 1 << 16;

ffi::Error AdamStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars,
                        ffi::Buffer<ffi::S32> shard, ffi::RemainingArgs args,
                        ffi::RemainingRets rets, ffi::Span<const int64_t> segment_sizes,
                        ffi::Span<const int8_t> decay, int64_t shard_size, bool whole) {
  const size_t num_leaves = args.size() / 4;
  const int64_t num_segments = static_cast<int64_t>(decay.size());
  int8_t max_index = 0;
  for (int8_t k : decay) max_index = std::max(max_index, k);
  if (scalars.element_count() != kNumScalars + max_index) {
    return ffi::Error::InvalidArgument("od_adam_step: expected 15 scalars and one per decay index");
  }
  if (shard.element_count() != 1 || shard.typed_data()[0] < 0 || shard_size < 0) {
    return ffi::Error::InvalidArgument("od_adam_step: expected one shard index >= 0");
  }
  if (args.size() != 4 * num_leaves || rets.size() != 3 * num_leaves ||
      static_cast<int64_t>(segment_sizes.size()) != num_segments) {
    return ffi::Error::InvalidArgument(
        "od_adam_step: expected 4 inputs (theta, g, m, v) and 3 outputs per leaf, and one "
        "decay flag per segment");
  }
  auto work = std::make_shared<Work>();
  const float* x = scalars.typed_data();
  work->s = Scalars{x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9], x[10], x[11],
                    x[12], x[13], x[14]};
  if (work->s.mode != 0.0f && work->s.mode != 1.0f && work->s.mode != 2.0f) {
    return ffi::Error::InvalidArgument("od_adam_step: mode must be 0, 1 or 2");
  }
  const int64_t* sizes = segment_sizes.begin();
  int64_t segment = 0, segment_left = num_segments ? sizes[0] : 0;
  for (int64_t skip = shard.typed_data()[0] * shard_size; skip > 0;) {  // segments before this shard.
    const int64_t len = std::min(skip, segment_left);
    skip -= len;
    segment_left -= len;
    if (segment_left == 0) {
      if (segment + 1 >= num_segments) {
        return ffi::Error::InvalidArgument("od_adam_step: offset beyond the segments");
      }
      segment_left = sizes[++segment];
    }
  }
  for (size_t k = 0; k < num_leaves; ++k) {
    auto theta = args.get<ffi::AnyBuffer>(4 * k);
    auto g = args.get<ffi::AnyBuffer>(4 * k + 1);
    auto m = args.get<ffi::Buffer<ffi::F32>>(4 * k + 2);
    auto v = args.get<ffi::Buffer<ffi::F32>>(4 * k + 3);
    auto theta_out = rets.get<ffi::AnyBuffer>(3 * k);
    auto m_out = rets.get<ffi::Buffer<ffi::F32>>(3 * k + 1);
    auto v_out = rets.get<ffi::Buffer<ffi::F32>>(3 * k + 2);
    if (theta.has_error() || g.has_error() || m.has_error() || v.has_error() ||
        theta_out.has_error() || m_out.has_error() || v_out.has_error()) {
      return ffi::Error::InvalidArgument("od_adam_step: m and v must be float32");
    }
    auto kind = [](ffi::DataType t, Kind* out) {
      if (t == ffi::DataType::F32) *out = Kind::kF32;
      else if (t == ffi::DataType::BF16) *out = Kind::kBF16;
      else return false;
      return true;
    };
    Kind theta_kind, g_kind;
    if (!kind(theta->element_type(), &theta_kind) || !kind(g->element_type(), &g_kind) ||
        (*theta_out)->element_type() != theta->element_type()) {
      return ffi::Error::InvalidArgument("od_adam_step: theta and g must be float32 or bfloat16");
    }
    const int64_t n = theta->element_count();
    if (g->element_count() != n || m->element_count() != n || v->element_count() != n ||
        (*theta_out)->element_count() != n) {
      return ffi::Error::InvalidArgument("od_adam_step: theta, g, m, v sizes differ");
    }
    // The outputs alias the inputs (input_output_aliases): updates are made in place.
    if ((*theta_out)->untyped_data() != theta->untyped_data() ||
        (*m_out)->typed_data() != m->typed_data() ||
        (*v_out)->typed_data() != v->typed_data()) {
      return ffi::Error::InvalidArgument("od_adam_step: outputs must alias theta, m and v");
    }
    for (int64_t start = 0; start < n;) {  // cut the leaf at segment ends.
      while (segment_left == 0 && segment + 1 < num_segments) segment_left = sizes[++segment];
      if (segment_left <= 0) {
        return ffi::Error::InvalidArgument("od_adam_step: segment sizes do not cover the leaves");
      }
      const int64_t len = std::min(n - start, segment_left);
      const size_t theta_bytes = theta_kind == Kind::kBF16 ? 2 : 4;
      const size_t g_bytes = g_kind == Kind::kBF16 ? 2 : 4;
      work->runs.push_back(Run{
          static_cast<char*>((*theta_out)->untyped_data()) + start * theta_bytes,
          static_cast<const char*>(g->untyped_data()) + start * g_bytes,
          (*m_out)->typed_data() + start, (*v_out)->typed_data() + start, len,
          decay[segment] > 0, decay[segment] > 0 ? x[kNumScalars + decay[segment] - 1] : 0.0f,
          theta_kind, g_kind});
      start += len;
      segment_left -= len;
      work->total += len;
    }
  }
  if (whole && (segment_left != 0 || segment + 1 < num_segments)) {
    for (int64_t s = segment + 1; s < num_segments; ++s) segment_left += sizes[s];
    if (segment_left != 0) {
      return ffi::Error::InvalidArgument("od_adam_step: segment sizes exceed the leaves");
    }
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->parts = (work->total < kMinParallel || threads == 1) ? 1 : 4 * threads;
  for (int64_t t = 1; t < std::min(threads, work->parts); ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();  // the caller works too, so this finishes even if no pool thread is free.
  while (work->done.load(std::memory_order_acquire) < work->parts) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OdAdamStep, AdamStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scalars
                                  .Arg<ffi::Buffer<ffi::S32>>()  // shard
                                  .RemainingArgs()               // θ, g, m, v per leaf
                                  .RemainingRets()               // θ, m, v per leaf
                                  .Attr<ffi::Span<const int64_t>>("segment_sizes")
                                  .Attr<ffi::Span<const int8_t>>("decay")  // per segment
                                  .Attr<int64_t>("shard_size")
                                  .Attr<bool>("whole"));  // the leaves end with the segments
