#pragma once
// __half on the host for the emulator: binary16 bits, converted through GCC's _Float16 (round to
// nearest even, as __float2half_rn). c10/util/Half.h includes this header (the emulator defines
// __CUDACC__), so it must not include c10 itself.
#include <cstdint>
#include <cstring>
struct __half {
  uint16_t x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
