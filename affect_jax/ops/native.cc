// What the Python loader (native.py) checks before it registers the extension's kernels: the
// revision of these sources and the oneDNN version the extension was built against.

#include "oneapi/dnnl/dnnl.hpp"

// Bumped whenever a handler's signature or the build changes, so Python can tell an extension
// built from older sources (an editable install not rebuilt) from a current one.
extern "C" int affect_jax_extension_revision() { return 8; }

// Lets Python check it loaded the libdnnl it was built against.
extern "C" int affect_jax_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
