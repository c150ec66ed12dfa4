// Shared by the extension's oneDNN users (onednn_conv.cc, winograd.cc): the one CPU
// engine, the conversion of oneDNN's exceptions into XLA FFI errors, and the inference
// forward pass on a kernel packed for Winograd (which onednn_conv.cc's handlers dispatch to).

#ifndef AFFECT_JAX_OPS_ONEDNN_UTIL_H_
#define AFFECT_JAX_OPS_ONEDNN_UTIL_H_

#include <cstdint>
#include <new>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// The CPU engine every primitive of the extension runs on (defined in onednn_conv.cc).
dnnl::engine& AffectJaxCpuEngine();

namespace affect_jax {

// Returns body()'s error, or an internal error naming `what` if oneDNN throws or memory runs
// out: an exception must not cross the FFI boundary into XLA.
template <typename Body>
xla::ffi::Error CatchOneDnnErrors(const std::string& what, Body body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return xla::ffi::Error::Internal(what + ": " + e.what());
  } catch (const std::bad_alloc&) {
    return xla::ffi::Error::Internal(what + ": out of memory");
  }
}

// Whether `packed` is a kernel that winograd.cc's Pack packed (a uint8 buffer with its header).
bool IsWinogradPacked(xla::ffi::AnyBuffer packed);

// y = conv3x3(x, packed kernel) + bias (+ y's previous contents if `accumulate`), then
// max(0, .) if `relu`: float32, stride 1, padding (pad_top, pad_left) before the input and the
// rest implied by y's size.
xla::ffi::Error WinogradForwardPacked(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer packed,
                                      xla::ffi::AnyBuffer bias, xla::ffi::AnyBuffer y,
                                      int64_t pad_top, int64_t pad_left, bool relu,
                                      bool accumulate);

}  // namespace affect_jax

#endif  // AFFECT_JAX_OPS_ONEDNN_UTIL_H_
