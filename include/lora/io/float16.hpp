// Host conversions between float/double and the two 16-bit floating formats
// safetensors files carry: IEEE 754 binary16 ("F16": 1 sign, 5 exponent, 10
// fraction bits) and bfloat16 ("BF16": 1, 8, 7 - the top half of a float).
//
//   16-bit -> float or double: exact (every F16 and BF16 value is a float).
//   float  -> 16-bit: round to nearest, ties to even; overflow -> +-inf;
//                     NaN stays NaN (quiet bit set, top payload bits kept).
//   double -> 16-bit: rounded once, directly: the double is first rounded to
//                     float "to odd", which cannot create a second rounding
//                     error because float keeps >= 2 more bits than F16/BF16.
//   double -> float:  round to nearest, ties to even (IEEE 754 default); beyond
//                     the float range -> +-inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace lora::io {

static_assert(std::numeric_limits<float>::is_iec559 && std::numeric_limits<double>::is_iec559,
              "lora::io conversions assume IEEE 754 float and double");

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float float_from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---- binary16 ------------------------------------------------------------------

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu;
  const std::uint32_t fraction = h & 0x3FFu;
  if (exponent == 0x1F) return float_from_bits(sign | 0x7F800000u | (fraction << 13));  // inf, NaN (payload kept)
  if (exponent == 0) {
    // zero or subnormal: fraction * 2^-24, exact in float.
    const float magnitude = static_cast<float>(fraction) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  // normal: rebias the exponent from 15 to 127.
  return float_from_bits(sign | ((exponent + 112u) << 23) | (fraction << 13));
}

inline std::uint16_t float_to_half(float f) {
  const std::uint32_t x = float_bits(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t magnitude = x & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u)  // NaN: quiet, keep the top 9 payload bits
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  if (magnitude == 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  const int e = static_cast<int>(magnitude >> 23) - 127;  // |f| in [2^e, 2^(e+1))
  if (e > 15) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 2^16: beyond the largest half
  if (e < -25) return sign;  // < 2^-25, half the smallest subnormal: rounds to zero
  // Here f is a normal float: significand m = 1.fraction as a 24-bit integer, |f| = m 2^(e-23).
  // The half quantum is 2^(e-10) for normals (e >= -14) and 2^-24 below: shift m right by 13 (or more).
  const std::uint32_t m = (magnitude & 0x7FFFFFu) | 0x800000u;
  const int shift = 13 + (e < -14 ? -14 - e : 0);  // 13 .. 24
  std::uint32_t q = m >> shift;
  const std::uint32_t rest = m & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (q & 1u))) ++q;  // nearest, ties to even
  if (e < -14) return static_cast<std::uint16_t>(sign | q);  // subnormal; a carry to 0x400 is the smallest normal
  // q holds the implicit bit (0x400); a carry to 0x800 moves to the next exponent, up to inf (0x7C00).
  return static_cast<std::uint16_t>(sign | ((static_cast<std::uint32_t>(e + 14) << 10) + q));
}

// ---- bfloat16 ------------------------------------------------------------------

inline float bfloat16_to_float(std::uint16_t b) { return float_from_bits(static_cast<std::uint32_t>(b) << 16); }

inline std::uint16_t float_to_bfloat16(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  // Add just under half a bf16 ulp, plus one when the kept part is odd: nearest, ties to even.
  // Carries propagate into the exponent, so FLT_MAX rounds to inf as IEEE requires.
  return static_cast<std::uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// ---- double ----------------------------------------------------------------------

// d rounded to the nearest float, ties to even; +-inf beyond the float range
// (at or above 2^128 - 2^103, halfway between FLT_MAX and 2^128).
inline float double_to_float(double d) {
  constexpr double kOverflow = 0x1p128 - 0x1p103;
  if (std::fabs(d) >= kOverflow && !std::isnan(d))
    return d < 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  return static_cast<float>(d);  // in range: the IEEE conversion, round to nearest even
}

// d rounded to float "to odd": d itself when representable, otherwise the
// neighbour toward zero with its last bit set. Rounding this to a format with
// at least two fewer significand bits gives the same result as rounding d.
inline float double_to_float_round_to_odd(double d) {
  if (std::isnan(d) || std::isinf(d)) return static_cast<float>(d);
  float f;
  if (std::fabs(d) > static_cast<double>(std::numeric_limits<float>::max())) {
    f = std::numeric_limits<float>::max();  // truncation toward zero; its last bit is already 1
    return d < 0 ? -f : f;
  }
  f = static_cast<float>(d);
  if (static_cast<double>(f) == d) return f;
  std::uint32_t bits = float_bits(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) --bits;  // rounded away from zero: step back
  return float_from_bits(bits | 1u);
}

inline std::uint16_t double_to_half(double d) { return float_to_half(double_to_float_round_to_odd(d)); }
inline std::uint16_t double_to_bfloat16(double d) { return float_to_bfloat16(double_to_float_round_to_odd(d)); }

}  // namespace lora::io
