// Shared by the extension's oneDNN users (onednn_conv.cc, winograd.cc): the one CPU
// engine and the conversion of oneDNN's exceptions into XLA FFI errors.

#ifndef AFFECT_JAX_OPS_ONEDNN_UTIL_H_
#define AFFECT_JAX_OPS_ONEDNN_UTIL_H_

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

}  // namespace affect_jax

#endif  // AFFECT_JAX_OPS_ONEDNN_UTIL_H_
