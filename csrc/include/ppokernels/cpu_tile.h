// Square tiles of kVecF x kVecF floats moved between rows in memory and the SIMD lanes, for the
// scans that run one row per lane (gae.cpp): a recurrence along a row is a chain of dependent
// operations, so instead of one row at a time, kVecF rows advance together, step by step, and
// the tile transpose turns kVecF consecutive steps of kVecF rows into kVecF vectors, one per
// step. The transposes are in registers at the AVX2 and AVX512 levels (24 and 64 shuffles per
// tile), through a buffer at the DEFAULT one.
#pragma once
#include "ppokernels/cpu_vec.h"

namespace ppokernels::CPU_CAPABILITY {

#define PPK_TILE_INLINE inline __attribute__((always_inline))

// In place: afterwards x[c] holds, in lane k, what x[k] held in lane c.
PPK_TILE_INLINE void transpose_tile(SimdF* x) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = x[i].v;
  // 32-bit interleave of row pairs, then 64-bit interleave of pair pairs: each 128-bit lane l of
  // a[4i + j] holds column 4l + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const auto pd = [&](int j) { return _mm512_castps_pd(b[i + j]); };
    a[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(0), pd(2)));
    a[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(0), pd(2)));
    a[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(1), pd(3)));
    a[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(1), pd(3)));
  }
  // Then the 128-bit lanes: even / odd lanes of row groups (0, 1) and (2, 3), twice.
  for (int i = 0; i < 4; ++i) {
    b[i] = _mm512_shuffle_f32x4(a[i], a[i + 4], 0x88);
    b[i + 4] = _mm512_shuffle_f32x4(a[i], a[i + 4], 0xdd);
    b[i + 8] = _mm512_shuffle_f32x4(a[i + 8], a[i + 12], 0x88);
    b[i + 12] = _mm512_shuffle_f32x4(a[i + 8], a[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    x[i] = SimdF(_mm512_shuffle_f32x4(b[i], b[i + 8], 0x88));
    x[i + 8] = SimdF(_mm512_shuffle_f32x4(b[i], b[i + 8], 0xdd));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 a[8], b[8];
  for (int i = 0; i < 8; ++i) a[i] = x[i];
  for (int i = 0; i < 8; i += 2) {
    b[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    a[i] = _mm256_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    a[i + 1] = _mm256_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    a[i + 2] = _mm256_shuffle_ps(b[i + 1], b[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    a[i + 3] = _mm256_shuffle_ps(b[i + 1], b[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = SimdF(_mm256_permute2f128_ps(a[i], a[i + 4], 0x20));
    x[i + 4] = SimdF(_mm256_permute2f128_ps(a[i], a[i + 4], 0x31));
  }
#else
  float buf[kVecF][kVecF];
  for (int64_t k = 0; k < kVecF; ++k) x[k].store(buf[k]);
  for (int64_t c = 0; c < kVecF; ++c) {
    float col[kVecF];
    for (int64_t k = 0; k < kVecF; ++k) col[k] = buf[k][c];
    x[c] = SimdF::loadu(col);
  }
#endif
}

// The rows of a tile: row k < rows (of kVecF) covers columns [t0 + dk k, t0 + dk k + kVecF) of its
// row, clipped to [0, len). A skew dk = +-kVecF puts each row one tile behind the previous one:
// when a row is a multiple of 1 KiB long, the same column of kVecF rows falls in one L1 set (and
// aliases modulo 4 KiB), so an unskewed tile's 2 x kVecF output lines thrash that set (gae's
// scan took markedly longer per token at T = 1024 and 2048 than at T = 1040). f(k, tk, lo, hi)
// gets the row's first column tk and its valid tile columns [lo, hi) (empty for rows >= rows).
template <typename F>
PPK_TILE_INLINE void for_tile_rows(int64_t rows, int64_t t0, int64_t dk, int64_t len, const F& f) {
  for (int64_t k = 0; k < kVecF; ++k) {
    const int64_t tk = t0 + dk * k;
    const int64_t lo = std::max<int64_t>(0, -tk), hi = std::min<int64_t>(kVecF, len - tk);
    f(k, tk, k < rows ? lo : 0, k < rows ? hi : 0);
  }
}

// One row of a tile: kVecF values as float lanes, a bool mask as 1 / 0.
template <typename scalar_t>
PPK_TILE_INLINE SimdF load_tile_row(const scalar_t* row) {
  if constexpr (std::is_same_v<scalar_t, bool>) {
    return vload_mask<SimdF>(row);
  } else {
    return vload<SimdF>(row);
  }
}

// Loads a tile from rows `stride` apart at p, transposed: x[c] holds, in lane k, column tk + c of
// row k (for_tile_rows); columns outside [0, len) and rows >= rows are 0.
template <typename scalar_t>
PPK_TILE_INLINE void load_tile(const scalar_t* p, int64_t stride, int64_t rows, int64_t t0,
                               int64_t dk, int64_t len, SimdF* x) {
  using buf_t = std::conditional_t<std::is_same_v<scalar_t, bool>, bool, float>;
  for_tile_rows(rows, t0, dk, len, [&](int64_t k, int64_t tk, int64_t lo, int64_t hi) {
    const scalar_t* row = p + k * stride + tk;
    if (lo == 0 && hi == kVecF) {
      x[k] = load_tile_row(row);
      return;
    }
    alignas(64) buf_t buf[kVecF] = {};
    for (int64_t c = lo; c < hi; ++c) buf[c] = static_cast<buf_t>(row[c]);
    x[k] = load_tile_row(buf);
  });
  transpose_tile(x);
}

// The inverse of load_tile, in scalar_t, for the valid columns only (x is clobbered).
template <typename scalar_t>
PPK_TILE_INLINE void store_tile(SimdF* x, scalar_t* p, int64_t stride, int64_t rows, int64_t t0,
                                int64_t dk, int64_t len) {
  transpose_tile(x);
  for_tile_rows(rows, t0, dk, len, [&](int64_t k, int64_t tk, int64_t lo, int64_t hi) {
    scalar_t* row = p + k * stride + tk;
    if (std::is_same_v<scalar_t, float> && lo == 0 && hi == kVecF) {
      vstore(reinterpret_cast<float*>(row), x[k]);
      return;
    }
    alignas(64) float buf[kVecF];
    vstore(buf, x[k]);
    for (int64_t c = lo; c < hi; ++c) row[c] = static_cast<scalar_t>(buf[c]);
  });
}

// Asks for the first line of each row's tile (for_tile_rows' columns; none outside [0, len)):
// called for a tile a few ahead of the one loaded. The scans read kVecF rows of 2 to 3 arrays at
// once, more streams than the hardware prefetchers follow: rows out of cache (gae at 256 x 4096)
// waited on their loads without it; rows in cache run the same with or without.
template <typename scalar_t>
PPK_TILE_INLINE void prefetch_tile(const scalar_t* p, int64_t stride, int64_t rows, int64_t t0,
                                   int64_t dk, int64_t len) {
  if (p == nullptr) return;
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t tk = t0 + dk * k;
    if (tk >= 0 && tk < len) __builtin_prefetch(p + k * stride + tk);
  }
}

// The skew of the scans' tiles for rows of len steps (for_tile_rows): one tile when a row is a
// multiple of 1 KiB of fp32, else none (the skew costs rows - 1 extra tile steps per group).
inline int64_t tile_skew(int64_t len) { return len % 256 == 0 ? kVecF : 0; }

#undef PPK_TILE_INLINE

}  // namespace ppokernels::CPU_CAPABILITY
