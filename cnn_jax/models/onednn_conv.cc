// oneDNN's 2-D convolution and its two gradients as XLA FFI handlers, for XLA:CPU.
//
// Layouts are JAX's: input and output NHWC, kernel HWIO, float32. Activations stay NHWC
// (oneDNN's channels-last kernels, as PyTorch's channels_last uses); the kernel is
// copied into the primitive's blocked layout per call, in a buffer each thread keeps.
// Built by cnn_jax/models/onednn_conv.py against the `onednn-devel` wheel's headers.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One stream per XLA thread: XLA may run independent convolutions concurrently.
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// Memory each thread keeps across calls and grows as needed, one slot per use: the
// blocked kernel (or kernel gradient) and the primitive's scratchpad (user-managed, as
// PyTorch has it). With a fresh allocation per call, ResNet-18's kernel reorders took
// 50 ms a step against PyTorch's 13; kept, 18.5 (ONEDNN_VERBOSE=profile_exec). Each call
// waits for its stream, so one buffer per slot suffices.
enum Slot { kKernelSlot = 0, kScratchSlot = 1 };

memory ThreadBuffer(const memory::desc& md, Slot slot) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[2];
  Buffer& b = buffers[slot];
  const size_t size = md.get_size();
  if (size > b.size) {
    std::free(b.data);
    b.size = (size + 63) / 64 * 64;
    b.data = std::aligned_alloc(64, b.size);
  }
  return memory(md, Engine(), b.data);
}

enum Kind { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

// oneDNN's logical dims (N C H W; O I H W) and the window, from JAX's shapes.
struct Geometry {
  memory::dims src, wei, dst, strides, dilates, pad_lo, pad_hi;

  std::string Key(Kind kind) const {
    std::string key = std::to_string(kind);
    for (const memory::dims* v : {&src, &wei, &dst, &strides, &dilates, &pad_lo, &pad_hi}) {
      for (auto d : *v) key += "," + std::to_string(d);
      key += ";";
    }
    return key;
  }
  memory::desc Src() const { return memory::desc(src, kF32, Tag::nhwc); }
  memory::desc Dst() const { return memory::desc(dst, kF32, Tag::nhwc); }
  memory::desc Hwio() const { return memory::desc(wei, kF32, Tag::hwio); }
  memory::desc AnyWei() const { return memory::desc(wei, kF32, Tag::any); }
};

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  return Geometry{{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]},
                  {sh, sw}, {0, 0}, {pt, pl}, {pb, pr}};
}

// Where each element of a 4-D (O I H W) kernel lies in a blocked layout, as a sum of
// one offset per dimension: an index's outer part times its stride, plus its place in
// each inner block on that dimension (oneDNN's blocking: e.g. ABcd8b8a). Small kernels
// are copied between layouts by these tables on the calling thread (Relayout). A oneDNN
// reorder goes through the SYCL runtime the `onednn` wheel runs every primitive on: in
// ResNet-20's step, 0.08 ms a call for a 9-147 KiB kernel against 0.01 in PyTorch
// (results/benchmark/torch_gap_cpu.md). Past 64K elements the reorder's two threads win
// (a 128x128x3x3 kernel: 0.06-0.10 ms against Relayout's 0.11; 512x512x3x3: 1.1-1.8
// against 1.7-3.1), so larger kernels keep it.
constexpr int64_t kRelayoutMaxElements = 1 << 16;

struct Layout {
  std::vector<int64_t> offsets[4];  // per logical dimension O, I, H, W
  size_t bytes = 0;                 // the buffer's size, padding included
  bool padded = false;              // blocks padded past a dimension: zeros there

  Layout(const memory::desc& md = {}) {  // Not explicit: Primitive's aggregate init uses {}.
    if (md.get_ndims() != 4) return;
    const memory::dims dims = md.get_dims(), strides = md.get_strides();
    const memory::dims blks = md.get_inner_blks(), idxs = md.get_inner_idxs();
    bytes = md.get_size();
    int64_t elements = 1;
    for (int d = 0; d < 4; ++d) {
      elements *= dims[d];
      int64_t block = 1;
      for (size_t j = 0; j < blks.size(); ++j) block *= idxs[j] == d ? blks[j] : 1;
      for (int64_t p = 0; p < dims[d]; ++p) {
        int64_t offset = p / block * strides[d], inner = 1, later = 1;
        for (size_t j = blks.size(); j-- > 0; inner *= blks[j]) {
          if (idxs[j] != d) continue;
          offset += p / later % blks[j] * inner;
          later *= blks[j];
        }
        offsets[d].push_back(offset);
      }
    }
    padded = bytes > static_cast<size_t>(elements) * sizeof(float);
  }
};

// Copies a kernel from one layout into another (every element of `to` written).
void Relayout(const Layout& from, const float* src, const Layout& to, float* dst) {
  if (to.padded) std::memset(dst, 0, to.bytes);
  const auto &fo = from.offsets[0], &fi = from.offsets[1], &fh = from.offsets[2],
             &fw = from.offsets[3];
  const auto &to_o = to.offsets[0], &ti = to.offsets[1], &th = to.offsets[2],
             &tw = to.offsets[3];
  for (size_t h = 0; h < fh.size(); ++h)
    for (size_t w = 0; w < fw.size(); ++w)
      for (size_t i = 0; i < fi.size(); ++i) {
        const float* s = src + fh[h] + fw[w] + fi[i];
        float* d = dst + th[h] + tw[w] + ti[i];
        for (size_t o = 0; o < fo.size(); ++o) d[to_o[o]] = s[fo[o]];
      }
}

struct Primitive {
  dnnl::primitive prim;
  memory::desc wei;      // the layout the primitive wants its (diff) weights in
  memory::desc scratch;  // its scratchpad (user-managed: ThreadBuffer)
  dnnl::reorder kernel;  // HWIO -> wei (forward, input gradient), wei -> HWIO (weight
                         // gradient), for large kernels; small ones by Relayout:
  Layout hwio, blocked;  // JAX's kernel layout and `wei`
};

// Primitive creation costs milliseconds (kernel JIT); each geometry is built once.
std::shared_ptr<Primitive> Get(const Geometry& g, Kind kind) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::shared_ptr<Primitive>> cache;
  const std::string key = g.Key(kind);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, algo, g.Src(), g.AnyWei(), g.Dst(), g.strides,
      g.dilates, g.pad_lo, g.pad_hi, attr);
  auto p = std::make_shared<Primitive>();
  if (kind == kForward) {
    *p = {dnnl::convolution_forward(fwd), fwd.weights_desc(), fwd.scratchpad_desc()};
  } else if (kind == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), algo, g.Src(), g.AnyWei(), g.Dst(),
                                                       g.strides, g.dilates, g.pad_lo, g.pad_hi,
                                                       fwd, attr);
    *p = {dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), algo, g.Src(), g.AnyWei(),
                                                          g.Dst(), g.strides, g.dilates, g.pad_lo,
                                                          g.pad_hi, fwd, attr);
    *p = {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), pd.scratchpad_desc()};
  }
  const int64_t elements = g.wei[0] * g.wei[1] * g.wei[2] * g.wei[3];
  if (p->wei != g.Hwio() && elements <= kRelayoutMaxElements) {
    p->hwio = Layout(g.Hwio()), p->blocked = Layout(p->wei);
  } else if (p->wei != g.Hwio()) {
    const bool to_blocked = kind != kWeightGrad;
    const memory::desc& from = to_blocked ? g.Hwio() : p->wei;
    const memory::desc& to = to_blocked ? p->wei : g.Hwio();
    p->kernel = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
  cache.emplace(key, p);
  return p;
}

memory Wrap(const memory::desc& md, void* data) { return memory(md, Engine(), data); }

// The HWIO kernel in the primitive's layout (a copy only where the layouts differ).
memory Weights(const Primitive& p, const Geometry& g, float* hwio, dnnl::stream& s) {
  memory plain = Wrap(g.Hwio(), hwio);
  if (p.wei == g.Hwio()) return plain;
  memory blocked = ThreadBuffer(p.wei, kKernelSlot);
  if (p.kernel) {
    p.kernel.execute(s, plain, blocked);
  } else {
    Relayout(p.hwio, hwio, p.blocked, static_cast<float*>(blocked.get_data_handle()));
  }
  return blocked;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  const Geometry g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb,
                                  pl, pr);
  auto p = Get(g, kForward);
  auto& s = Stream();
  p->prim.execute(s, {{DNNL_ARG_SRC, Wrap(g.Src(), x.typed_data())},
                      {DNNL_ARG_WEIGHTS, Weights(*p, g, w.typed_data(), s)},
                      {DNNL_ARG_DST, Wrap(g.Dst(), y->typed_data())},
                      {DNNL_ARG_SCRATCHPAD, ThreadBuffer(p->scratch, kScratchSlot)}});
  s.wait();
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr) {
  const Geometry g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt,
                                  pb, pl, pr);
  auto p = Get(g, kInputGrad);
  auto& s = Stream();
  p->prim.execute(s, {{DNNL_ARG_DIFF_DST, Wrap(g.Dst(), dy.typed_data())},
                      {DNNL_ARG_WEIGHTS, Weights(*p, g, w.typed_data(), s)},
                      {DNNL_ARG_DIFF_SRC, Wrap(g.Src(), dx->typed_data())},
                      {DNNL_ARG_SCRATCHPAD, ThreadBuffer(p->scratch, kScratchSlot)}});
  s.wait();
  return ffi::Error::Success();
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  const Geometry g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt,
                                  pb, pl, pr);
  auto p = Get(g, kWeightGrad);
  auto& s = Stream();
  memory hwio = Wrap(g.Hwio(), dw->typed_data());
  memory out = p->wei == g.Hwio() ? hwio : ThreadBuffer(p->wei, kKernelSlot);
  p->prim.execute(s, {{DNNL_ARG_SRC, Wrap(g.Src(), x.typed_data())},
                      {DNNL_ARG_DIFF_DST, Wrap(g.Dst(), dy.typed_data())},
                      {DNNL_ARG_DIFF_WEIGHTS, out},
                      {DNNL_ARG_SCRATCHPAD, ThreadBuffer(p->scratch, kScratchSlot)}});
  if (p->kernel) p->kernel.execute(s, out, hwio);
  s.wait();
  if (out != hwio && !p->kernel) {
    Relayout(p->blocked, static_cast<const float*>(out.get_data_handle()), p->hwio,
             dw->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

// Every handler: two float32 operands, one result, the strides and the four paddings.
#define CNN_JAX_CONV_BINDING                                                       \
  ffi::Ffi::Bind()                                                                 \
      .Arg<ffi::Buffer<ffi::F32>>()                                                \
      .Arg<ffi::Buffer<ffi::F32>>()                                                \
      .Ret<ffi::Buffer<ffi::F32>>()                                                \
      .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb") \
      .Attr<int64_t>("pl").Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnJaxOnednnConv, Forward, CNN_JAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnJaxOnednnConvInputGrad, InputGrad, CNN_JAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnJaxOnednnConvWeightGrad, WeightGrad, CNN_JAX_CONV_BINDING);
