// CPU kernels for the decode hot path, for x86 with AVX2 + FMA (the products also AVX-512).
//
// paged_decode_attention: attention of each sequence's queries over its KV blocks read
//   in place from the paged cache (no gather into a padded copy), returning (out, lse)
//   like MicroAttention. Online softmax, one (sequence, KV head) pair per task, the
//   query heads sharing that KV head processed together so each K and V row is loaded
//   once; blocks walked 4 tokens x all heads at a time, the next step's blocks
//   prefetched a few lines per such tile.
// pack_weight, linear_packed: y = x W^T + b for any number of rows, W packed once at load
//   time into panels of 16 output features (K x 16, contiguous) so that a register tile
//   of 6 rows x 16 features runs the whole K loop in registers with no per-call packing
//   (MKL repacks the weight on every call, which dominates at decode's 16-128 rows).
//   On CPUs with AVX-512 the same tiles run 512 bits wide (12 rows x 32 features), with
//   equal results bit for bit: 220-340 GFLOP/s against AVX2's 130-180 on 2 cores.
//   Weights stay float32 or bfloat16 (read as such: at one row this is a GEMV that streams
//   the weights once at memory speed); arithmetic is float32, rounded once, as a bfloat16
//   GEMM does. Every row's sum runs over k in the same order whatever the batch, so a
//   row's result does not depend on the rows beside it.
// linear_silu: the MLP's gate and up products from one packed weight (panels interleaved)
//   with SiLU-and-multiply applied in registers, so the 2x-wide product is never stored.
// prefill_attention: causal attention of prompts over their own keys, read from the flat
//   (strided) q, k, v rows with no padding, gather or GQA copies; tasks of 16 tokens x one
//   KV head's query heads, key blocks of 64 through register-tiled products and an
//   online softmax.
// rms_norm, silu_and_mul, rotary_: one pass each where PyTorch makes several (and in bfloat16
//   several upcast copies): milliseconds per decode step at batch 1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using bf16 = at::BFloat16;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const bf16* p) {
  // bfloat16 is the top half of a float32: widen and shift.
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp on 8 floats (Cephes polynomial, relative error ~2e-7); inputs below -87 give ~0.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// silu(g) * u on 8 floats: the one formula of both SiLU-and-multiply paths.
inline __m256 silu_mul8(__m256 g, __m256 u) {
  const __m256 sig = _mm256_div_ps(
      _mm256_set1_ps(1.0f),
      _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  return _mm256_mul_ps(_mm256_mul_ps(g, sig), u);
}

constexpr int kMaxRows = 32;   // query rows (queries x heads) one task holds
constexpr int kMaxHeadDim = 256;
constexpr int kMaxBlock = 64;  // tokens per block
constexpr int64_t kTileTokens = 4;  // a block is scored and summed 4 tokens (all heads) at a time

// Four 8-lane sums -> their four totals, in order.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// scores[i][t] = q[i] . keys[t] for R query rows (row stride kMaxHeadDim, kMaxBlock for
// scores) and ntok key rows (stride ldk) of 8 * vecs floats. Four keys at a time: 4R
// accumulators, each key vector loaded once for the R rows, one reduction per 4 scores.
template <int R, typename T>
inline void scores_block(const float* q, const T* keys, int64_t ldk, int64_t ntok, int64_t vecs,
                         float* scores) {
  int64_t t = 0;
  for (; t + 4 <= ntok; t += 4) {
    __m256 acc[R][4];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
    }
    const T* kt = keys + t * ldk;
    for (int64_t v = 0; v < vecs; ++v) {
      // R query vectors + 4R sums + one key vector at a time: at most 16 registers.
      __m256 qv[R];
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) qv[i] = _mm256_load_ps(q + i * kMaxHeadDim + 8 * v);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 k = load8(kt + j * ldk + 8 * v);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) acc[i][j] = _mm256_fmadd_ps(qv[i], k, acc[i][j]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i)
      _mm_storeu_ps(scores + i * kMaxBlock + t, hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
  }
  for (; t < ntok; ++t) {
    const T* kr = keys + t * ldk;
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t v = 0; v < vecs; ++v)
        a = _mm256_fmadd_ps(_mm256_load_ps(q + i * kMaxHeadDim + 8 * v), load8(kr + 8 * v), a);
      scores[i * kMaxBlock + t] = hsum(a);
    }
  }
}

// acc (R rows x 8V floats, row stride lda) += p (R rows x ntok; element (r, t) at
// p[r * p_row + t * p_tok]) . values (ntok x 8V, row stride ldv): the value rows are read
// once for all R rows. Decode keeps p by rows, prefill by keys.
template <int R, int V, typename T>
inline void values_block_rv(const float* p, int64_t p_row, int64_t p_tok, int64_t ntok,
                            const T* values, int64_t ldv, float* acc, int64_t lda) {
  __m256 a[R][V];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) a[r][j] = _mm256_loadu_ps(acc + r * lda + 8 * j);
  }
  for (int64_t t = 0; t < ntok; ++t) {
    // R weights + R * V sums + one value vector at a time: at most 16 registers.
    __m256 b[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) b[r] = _mm256_broadcast_ss(p + r * p_row + t * p_tok);
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) {
      const __m256 w = load8(values + t * ldv + 8 * j);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r][j] = _mm256_fmadd_ps(b[r], w, a[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) _mm256_storeu_ps(acc + r * lda + 8 * j, a[r][j]);
  }
}

template <typename T, int R>
inline void values_block_r(int nv, const float* p, int64_t p_row, int64_t p_tok, int64_t ntok,
                           const T* values, int64_t ldv, float* acc, int64_t lda) {
  switch (nv) {
    case 4: values_block_rv<R, 4>(p, p_row, p_tok, ntok, values, ldv, acc, lda); break;
    case 3: values_block_rv<R, 3>(p, p_row, p_tok, ntok, values, ldv, acc, lda); break;
    case 2: values_block_rv<R, 2>(p, p_row, p_tok, ntok, values, ldv, acc, lda); break;
    default: values_block_rv<R, 1>(p, p_row, p_tok, ntok, values, ldv, acc, lda); break;
  }
}

// The same for rows <= 3 and all of a head's dims (a multiple of 8): passes of up to 32.
template <typename T>
inline void values_block(int rows, const float* p, int64_t p_row, int64_t p_tok, int64_t ntok,
                         const T* values, int64_t ldv, float* acc, int64_t lda, int64_t head_dim) {
  for (int64_t c = 0; c < head_dim; c += 32) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (head_dim - c) / 8));
    switch (rows) {
      case 3: values_block_r<T, 3>(nv, p, p_row, p_tok, ntok, values + c, ldv, acc + c, lda); break;
      case 2: values_block_r<T, 2>(nv, p, p_row, p_tok, ntok, values + c, ldv, acc + c, lda); break;
      default: values_block_r<T, 1>(nv, p, p_row, p_tok, ntok, values + c, ldv, acc + c, lda); break;
    }
  }
}

// How many rows from r on (at most 3, the register tiles' height) read the same KV head.
inline int rows_sharing_a_head(const int64_t* row_offset, int64_t r, int64_t rows) {
  int n = 1;
  while (n < 3 && r + n < rows && row_offset[r + n] == row_offset[r]) ++n;
  return n;
}

// Software prefetch spread over a step's work: the next step's K and V blocks are asked
// for a few lines at a time between the score and value tiles, so that reading memory
// overlaps the arithmetic. (Asking for them all at once stalls the core until they
// arrive, and the hardware prefetchers do not follow a table of scattered blocks: both
// measured at ~60% of this spread form's speed on 64 sequences.)
struct BlockPrefetch {
  static constexpr int kLinesPerTile = 16;  // per score or value tile of 4 tokens
  const char* blocks[2 * kMaxBlock];
  int64_t count = 0, next = 0, offset = 0, block_bytes = 0;

  void reset(int64_t bytes) { count = next = offset = 0; block_bytes = bytes; }
  void add(const void* k_block, const void* v_block) {
    blocks[count++] = static_cast<const char*>(k_block);
    blocks[count++] = static_cast<const char*>(v_block);
  }
  inline void issue() {
    for (int i = 0; i < kLinesPerTile && next < count; ++i) {
      _mm_prefetch(blocks[next] + offset, _MM_HINT_T0);
      offset += 64;
      if (offset >= block_bytes) offset = 0, ++next;
    }
  }
};

// One task is a sequence and a range of its KV heads: with a sequence or more a thread,
// all heads (each block is then read front to back, which the prefetcher likes); with
// fewer, one KV head per task so that every core works. (Measured, 2 threads, SmolLM2,
// 4,096-token contexts: 2 and 3 sequences all heads a task 45.7 and 67.0 ms a step,
// one KV head a task 55.7 and 80.3 ms.)
// One owner's blocks: its pool and, per sequence, its table row and visible length.
template <typename T>
struct OwnerRun {
  const T* k_cache;
  const T* v_cache;
  const int64_t* table;  // (batch, table_width)
  int64_t table_width;
  const int64_t* kv_len;  // (batch,)
};

// Several owners in one pass: the online softmax carries on from one owner's blocks to
// the next, which is exactly the merge of their (out, lse) partials.
template <typename T>
void paged_decode_attention_impl(
    const T* q, const std::vector<OwnerRun<T>>& owners, T* out, float* lse, int64_t batch,
    int64_t num_q, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
    float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t splits = batch >= at::get_num_threads() ? 1 : kv_heads;
  const int64_t heads_per_split = kv_heads / splits;
  const int64_t rows = num_q * group * heads_per_split;
  const int64_t token_stride = kv_heads * head_dim;  // between tokens of a block
  const int64_t vecs = head_dim / 8;
  // Tiles of 4 tokens x all heads interleave the prefetches; a task of one KV head (few
  // sequences) prefetches nothing and takes whole blocks.
  const int64_t tile = splits == 1 ? kTileTokens : block_size;
  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float qf[kMaxRows][kMaxHeadDim];
    alignas(32) float acc[kMaxRows][kMaxHeadDim];
    alignas(32) float scores[kMaxRows][kMaxBlock];
    float row_max[kMaxRows], row_sum[kMaxRows];
    int64_t row_head[kMaxRows], row_query[kMaxRows], row_offset[kMaxRows];
    BlockPrefetch prefetch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits, first_kv_head = (task % splits) * heads_per_split;
      // Row r: query token r / (group * heads_per_split), head first_kv_head * group + the rest.
      for (int64_t r = 0; r < rows; ++r) {
        row_query[r] = r / (group * heads_per_split);
        row_head[r] = first_kv_head * group + r % (group * heads_per_split);
        row_offset[r] = (row_head[r] / group) * head_dim;  // its KV head within a token
        const T* src = q + ((b * num_q + row_query[r]) * heads + row_head[r]) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[r][d] = to_float(src[d]) * scale;
        for (int64_t d = 0; d < head_dim; ++d) acc[r][d] = 0.0f;
        row_max[r] = -std::numeric_limits<float>::infinity();
        row_sum[r] = 0.0f;
      }
      for (const OwnerRun<T>& run : owners) {
        const int64_t length = run.kv_len[b];
        // Blocks go kMaxBlock tokens at a time (several small blocks per softmax step).
        const int64_t per_step = std::max<int64_t>(1, kMaxBlock / block_size);
        const int64_t num_blocks = (length + block_size - 1) / block_size;
        const int64_t* table = run.table + b * run.table_width;
        const int64_t block_bytes = block_size * token_stride * static_cast<int64_t>(sizeof(T));
        for (int64_t blk0 = 0; blk0 < num_blocks; blk0 += per_step) {
          const int64_t blk1 = std::min(num_blocks, blk0 + per_step);
          // Blocks lie anywhere in the pool: the next step's (more of this sequence, else
          // the next task's first ones) are asked for while these are used. Tasks of one
          // KV head read a third of each block and leave it to the hardware.
          prefetch.reset(block_bytes);
          if (splits == 1) {
            const OwnerRun<T>* next_run = &run;
            int64_t next_seq = b, next_first = blk1, next_count = num_blocks;
            if (blk1 >= num_blocks) {  // the next owner's blocks, or the next task's
              const bool last_owner = &run == &owners.back();
              next_run = !last_owner ? &run + 1 : task + 1 < end ? &owners[0] : nullptr;
              next_seq = last_owner ? b + 1 : b, next_first = 0;
              if (next_run) next_count = (next_run->kv_len[next_seq] + block_size - 1) / block_size;
            }
            const int64_t* next_table = next_run ? next_run->table + next_seq * next_run->table_width : nullptr;
            for (int64_t nb = next_first; next_run && nb < std::min(next_count, next_first + per_step); ++nb)
              prefetch.add(next_run->k_cache + next_table[nb] * block_size * token_stride,
                           next_run->v_cache + next_table[nb] * block_size * token_stride);
          }
          // Scores of every block of the step, side by side; rows that share a KV head (up
          // to 3) score 4 keys at a time together.
          int64_t ntok = 0;
          for (int64_t blk = blk0; blk < blk1; ++blk) {
            const int64_t n_here = std::min(block_size, length - blk * block_size);
            const T* kb = run.k_cache + table[blk] * block_size * token_stride;
            for (int64_t t0 = 0; t0 < n_here; t0 += tile) {
              const int64_t nt = std::min<int64_t>(tile, n_here - t0);
              for (int64_t r = 0; r < rows;) {
                const int n = rows_sharing_a_head(row_offset, r, rows);
                const T* keys = kb + t0 * token_stride + row_offset[r];
                float* dst = &scores[r][ntok + t0];
                prefetch.issue();
                switch (n) {
                  case 3: scores_block<3>(&qf[r][0], keys, token_stride, nt, vecs, dst); break;
                  case 2: scores_block<2>(&qf[r][0], keys, token_stride, nt, vecs, dst); break;
                  default: scores_block<1>(&qf[r][0], keys, token_stride, nt, vecs, dst); break;
                }
                r += n;
              }
            }
            ntok += n_here;
          }
          for (int64_t r = 0; r < rows; ++r) {
            int64_t t = 0;
            __m256 mx8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
            for (; t + 8 <= ntok; t += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(scores[r] + t));
            alignas(32) float lanes[8];
            _mm256_store_ps(lanes, mx8);
            float block_max = lanes[0];
            for (int i = 1; i < 8; ++i) block_max = std::max(block_max, lanes[i]);
            for (; t < ntok; ++t) block_max = std::max(block_max, scores[r][t]);
            const float new_max = std::max(row_max[r], block_max);
            const float correction = std::exp(row_max[r] - new_max);  // 0 on the first block
            row_max[r] = new_max;
            const __m256 m = _mm256_set1_ps(new_max);
            t = 0;
            __m256 sum8 = _mm256_setzero_ps();
            for (; t + 8 <= ntok; t += 8) {
              __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores[r] + t), m));
              _mm256_storeu_ps(scores[r] + t, p);
              sum8 = _mm256_add_ps(sum8, p);
            }
            float sum = hsum(sum8);
            for (; t < ntok; ++t) {
              scores[r][t] = std::exp(scores[r][t] - new_max);
              sum += scores[r][t];
            }
            row_sum[r] = row_sum[r] * correction + sum;
            if (correction != 1.0f) {
              const __m256 c = _mm256_set1_ps(correction);
              for (int64_t v = 0; v < vecs; ++v)
                _mm256_store_ps(acc[r] + 8 * v, _mm256_mul_ps(_mm256_load_ps(acc[r] + 8 * v), c));
            }
          }
          // Rows that share a KV head (up to 3) take each value row once, with their
          // sums in registers across a block's tokens.
          int64_t offset = 0;
          for (int64_t blk = blk0; blk < blk1; ++blk) {
            const int64_t n_here = std::min(block_size, length - blk * block_size);
            const T* vb = run.v_cache + table[blk] * block_size * token_stride;
            for (int64_t t0 = 0; t0 < n_here; t0 += tile) {
              const int64_t nt = std::min<int64_t>(tile, n_here - t0);
              for (int64_t r = 0; r < rows;) {
                const int n = rows_sharing_a_head(row_offset, r, rows);
                prefetch.issue();
                values_block<T>(n, &scores[r][offset + t0], kMaxBlock, 1, nt,
                                vb + t0 * token_stride + row_offset[r], token_stride, &acc[r][0],
                                kMaxHeadDim, head_dim);
                r += n;
              }
            }
            offset += n_here;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = out + ((b * num_q + row_query[r]) * heads + row_head[r]) * head_dim;
        float* lse_dst = lse + (b * num_q + row_query[r]) * heads + row_head[r];
        if (row_sum[r] == 0.0f) {  // no visible key: the identity of the merge
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = T(0.0f);
          *lse_dst = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float inv = 1.0f / row_sum[r];
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = T(acc[r][d] * inv);
        *lse_dst = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

// ---- packed-weight GEMM -------------------------------------------------------------

constexpr int kPanel = 16;   // output features per packed panel (two AVX2 registers)
constexpr int kTileRows = 6;  // rows per register tile: 12 accumulators + 2 weights + 1 row
constexpr int64_t kRowBlockBytes = 192 * 1024;  // rows of x kept in L2 while panels stream

// R rows of x (float32, row stride ldx) times P adjacent panels (each K x 16) -> R x
// ncols of y. With few rows P = 2 gives the FMA units independent chains to overlap; the
// sum of every output still runs over k in order, so results do not depend on R or P.
template <int R, int P, typename W, typename Y>
inline void gemm_tile(const float* x, int64_t ldx, const W* panel, int64_t k_in, const float* bias,
                      Y* y, int64_t ldy, int64_t ncols) {
  constexpr int A = 2 * P;  // accumulators per row
  __m256 acc[R][A];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < A; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  const int64_t panel_stride = k_in * kPanel;
  for (int64_t k = 0; k < k_in; ++k) {
    __m256 w[A];
#pragma GCC unroll 4
    for (int j = 0; j < A; ++j) w[j] = load8(panel + (j / 2) * panel_stride + k * kPanel + (j % 2) * 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
#pragma GCC unroll 4
      for (int j = 0; j < A; ++j) acc[r][j] = _mm256_fmadd_ps(a, w[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    alignas(32) float v[P * kPanel];
#pragma GCC unroll 4
    for (int j = 0; j < A; ++j) {
      const __m256 b = bias && (j + 1) * 8 <= ncols ? _mm256_loadu_ps(bias + j * 8) : _mm256_setzero_ps();
      _mm256_store_ps(v + j * 8, _mm256_add_ps(acc[r][j], b));
    }
    Y* yr = y + r * ldy;
    if constexpr (std::is_same_v<Y, float>) {
      if (ncols == P * kPanel) {
#pragma GCC unroll 4
        for (int j = 0; j < A; ++j) _mm256_storeu_ps(yr + j * 8, _mm256_load_ps(v + j * 8));
        continue;
      }
    }
    for (int64_t j = 0; j < ncols; ++j) {  // bfloat16 (rounded once), or a ragged last panel
      const float b = bias && (j / 8 + 1) * 8 > ncols ? bias[j] : 0.0f;
      yr[j] = Y(v[j] + b);
    }
  }
}

template <int P, typename W, typename Y>
void gemm_tile_rows(int rows, const float* x, int64_t ldx, const W* panel, int64_t k_in,
                    const float* bias, Y* y, int64_t ldy, int64_t ncols) {
  switch (rows) {
    case 6: gemm_tile<6, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 5: gemm_tile<5, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 4: gemm_tile<4, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 3: gemm_tile<3, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 2: gemm_tile<2, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    default: gemm_tile<1, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
  }
}

// The same tiles 512 bits wide, for CPUs with AVX-512: a panel's 16 features are one
// register, a tile is up to 12 rows x 2 panels (24 accumulators), so each weight load
// feeds twice the FMAs. Every output is the same sum, over k in the same order, plus the
// same bias: results equal the AVX2 tiles' bit for bit.
#define IL_AVX512 __attribute__((target("avx512f,avx2,fma")))

IL_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
IL_AVX512 inline __m512 load16(const bf16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

template <int R, int P, typename W, typename Y>
IL_AVX512 inline void gemm_tile16(const float* x, int64_t ldx, const W* panel, int64_t k_in,
                                  const float* bias, Y* y, int64_t ldy, int64_t ncols) {
  __m512 acc[R][P];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int j = 0; j < P; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  const int64_t panel_stride = k_in * kPanel;
  for (int64_t k = 0; k < k_in; ++k) {
    __m512 w[P];
#pragma GCC unroll 2
    for (int j = 0; j < P; ++j) w[j] = load16(panel + j * panel_stride + k * kPanel);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
#pragma GCC unroll 2
      for (int j = 0; j < P; ++j) acc[r][j] = _mm512_fmadd_ps(a, w[j], acc[r][j]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    alignas(64) float v[P * kPanel];
#pragma GCC unroll 2
    for (int j = 0; j < P; ++j) {
      const __m512 b = bias && (j + 1) * kPanel <= ncols ? _mm512_loadu_ps(bias + j * kPanel)
                                                        : _mm512_setzero_ps();
      _mm512_store_ps(v + j * kPanel, _mm512_add_ps(acc[r][j], b));
    }
    Y* yr = y + r * ldy;
    if constexpr (std::is_same_v<Y, float>) {
      if (ncols == P * kPanel) {
#pragma GCC unroll 2
        for (int j = 0; j < P; ++j) _mm512_storeu_ps(yr + j * kPanel, _mm512_load_ps(v + j * kPanel));
        continue;
      }
    }
    for (int64_t j = 0; j < ncols; ++j) {  // bfloat16 (rounded once), or a ragged last panel
      const float b = bias && (j / kPanel + 1) * kPanel > ncols ? bias[j] : 0.0f;
      yr[j] = Y(v[j] + b);
    }
  }
}

template <int P, typename W, typename Y>
IL_AVX512 void gemm_tile16_rows(int rows, const float* x, int64_t ldx, const W* panel,
                                int64_t k_in, const float* bias, Y* y, int64_t ldy, int64_t ncols) {
  switch (rows) {
    case 12: gemm_tile16<12, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 11: gemm_tile16<11, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 10: gemm_tile16<10, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 9: gemm_tile16<9, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 8: gemm_tile16<8, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 7: gemm_tile16<7, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 6: gemm_tile16<6, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 5: gemm_tile16<5, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 4: gemm_tile16<4, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 3: gemm_tile16<3, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    case 2: gemm_tile16<2, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
    default: gemm_tile16<1, P>(x, ldx, panel, k_in, bias, y, ldy, ncols); break;
  }
}

// The two widths as the products below use them: rows per tile, panels per tile for a
// product of so many rows, and a tile of r <= kRows rows x P panels.
struct Avx2Tiles {
  static constexpr int kRows = kTileRows;
  // Up to 3 rows, panels go two at a time (a GEMV is then bound by memory, not FMA latency).
  static int64_t panels_per_tile(int64_t rows) { return rows <= 3 ? 2 : 1; }
  template <int P, typename W, typename Y>
  static void tile(int r, const float* x, int64_t ldx, const W* panel, int64_t k_in,
                   const float* bias, Y* y, int64_t ldy, int64_t ncols) {
    gemm_tile_rows<P, W, Y>(r, x, ldx, panel, k_in, bias, y, ldy, ncols);
  }
};

struct Avx512Tiles {
  static constexpr int kRows = 12;
  static int64_t panels_per_tile(int64_t) { return 2; }
  template <int P, typename W, typename Y>
  static void tile(int r, const float* x, int64_t ldx, const W* panel, int64_t k_in,
                   const float* bias, Y* y, int64_t ldy, int64_t ncols) {
    gemm_tile16_rows<P, W, Y>(r, x, ldx, panel, k_in, bias, y, ldy, ncols);
  }
};

bool has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}

// Which tiles a product runs on: vector_bits 512 or 256, or 0 for the widest this CPU has.
bool use_avx512(int64_t vector_bits, const char* name) {
  TORCH_CHECK(vector_bits == 0 || vector_bits == 256 || vector_bits == 512, name,
              ": vector_bits is 0 (the widest this CPU has), 256 or 512");
  TORCH_CHECK(vector_bits != 512 || has_avx512(), name, ": this CPU has no AVX-512");
  return vector_bits == 512 || (vector_bits == 0 && has_avx512());
}

// Rows of x kept in L2 while a thread's panels stream past them, a whole number of tiles.
template <typename Tiles>
int64_t row_block(int64_t k_in) {
  const int64_t rows = kRowBlockBytes / (k_in * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(Tiles::kRows, rows / Tiles::kRows * Tiles::kRows);
}

// x (M, K) float32, packed (panels, K, 16), bias (N,) float32 or null -> y (M, N).
// Threads split the panels; each walks a block of rows that stays in L2 across its panels.
template <typename Tiles, typename W, typename Y>
void linear_packed_impl(const float* x, const W* packed, const float* bias, Y* y,
                        int64_t rows, int64_t n_out, int64_t k_in) {
  const int64_t panels = (n_out + kPanel - 1) / kPanel;
  const int64_t block_rows = row_block<Tiles>(k_in);
  const int64_t step = Tiles::panels_per_tile(rows);
  const int64_t tasks = (panels + step - 1) / step;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t m0 = 0; m0 < rows; m0 += block_rows) {
      const int64_t m1 = std::min(rows, m0 + block_rows);
      for (int64_t t = first; t < last; ++t) {
        const int64_t p = t * step;
        const W* panel = packed + p * k_in * kPanel;
        const int64_t n = p * kPanel;
        const bool pair = step == 2 && p + 1 < panels;
        const int64_t ncols = std::min<int64_t>((pair ? 2 : 1) * kPanel, n_out - n);
        for (int64_t m = m0; m < m1; m += Tiles::kRows) {
          const int r = static_cast<int>(std::min<int64_t>(Tiles::kRows, m1 - m));
          const float* b = bias ? bias + n : nullptr;
          if (pair) {
            Tiles::template tile<2>(r, x + m * k_in, k_in, panel, k_in, b, y + m * n_out + n, n_out, ncols);
          } else {
            Tiles::template tile<1>(r, x + m * k_in, k_in, panel, k_in, b, y + m * n_out + n, n_out, ncols);
          }
        }
      }
    }
  });
}

// The MLP's gate and up products with SiLU-and-multiply in the epilogue: packed holds
// the panels of gate and up interleaved (gate features 16i.. then up features 16i..), so
// a tile computes both halves of 16 outputs for its rows; y (M, n_half) = silu(x Wg^T) *
// (x Wu^T) is all that is written (the (M, 2 n_half) product never reaches memory). The
// same sums and formula as linear_packed then silu_and_mul (bfloat16 rounds the product
// first, as that path does).
template <typename Tiles, typename W, typename Y>
void linear_silu_impl(const float* x, const W* packed, Y* y, int64_t rows, int64_t n_half,
                      int64_t k_in) {
  const int64_t pairs = (n_half + kPanel - 1) / kPanel;
  const int64_t block_rows = row_block<Tiles>(k_in);
  constexpr int64_t ld = 2 * kPanel;  // a row of the tile: [gate 16 | up 16]
  const bool together = Tiles::panels_per_tile(rows) == 2;  // gate and up in one tile
  at::parallel_for(0, pairs, 1, [&](int64_t first, int64_t last) {
    alignas(64) float gu[Tiles::kRows * ld];
    for (int64_t m0 = 0; m0 < rows; m0 += block_rows) {
      const int64_t m1 = std::min(rows, m0 + block_rows);
      for (int64_t t = first; t < last; ++t) {
        const W* gate = packed + 2 * t * k_in * kPanel;
        const int64_t n = t * kPanel;
        const int64_t ncols = std::min<int64_t>(kPanel, n_half - n);
        for (int64_t m = m0; m < m1; m += Tiles::kRows) {
          const int r = static_cast<int>(std::min<int64_t>(Tiles::kRows, m1 - m));
          const float* xm = x + m * k_in;
          if (together) {
            Tiles::template tile<2, W, float>(r, xm, k_in, gate, k_in, nullptr, gu, ld, ld);
          } else {
            Tiles::template tile<1, W, float>(r, xm, k_in, gate, k_in, nullptr, gu, ld, kPanel);
            Tiles::template tile<1, W, float>(r, xm, k_in, gate + k_in * kPanel, k_in, nullptr,
                                              gu + kPanel, ld, kPanel);
          }
          for (int i = 0; i < r; ++i) {
            float* row = gu + i * ld;
            if constexpr (std::is_same_v<Y, bf16>) {
              for (int64_t j = 0; j < ld; ++j) row[j] = static_cast<float>(bf16(row[j]));
            }
            alignas(32) float v[kPanel];
            _mm256_store_ps(v, silu_mul8(_mm256_load_ps(row), _mm256_load_ps(row + kPanel)));
            _mm256_store_ps(v + 8, silu_mul8(_mm256_load_ps(row + 8), _mm256_load_ps(row + kPanel + 8)));
            Y* yr = y + (m + i) * n_half + n;
            for (int64_t j = 0; j < ncols; ++j) yr[j] = Y(v[j]);
          }
        }
      }
    }
  });
}

// ---- causal prefill attention over flat rows -----------------------------------------

constexpr int kPrefillTokens = 32;  // query tokens per task (times the heads of a KV group)
constexpr int kKeyBlock = 64;       // keys per step of the online softmax

inline void store_row(float* dst, const float* src, int64_t n) { std::copy(src, src + n, dst); }
inline void store_row(bf16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16(src[i]);
}

// st (R keys x W query rows, row stride W) = keys (R x D, row stride ldk) . qt (D x W):
// R <= 6 keys, 16 query rows per pass; W a multiple of 16.
template <int R>
inline void scores_tile(const float* keys, int64_t ldk, const float* qt, int64_t width,
                        int64_t head_dim, float* st) {
  for (int64_t c = 0; c < width; c += 16) {
    __m256 acc0[R], acc1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm256_setzero_ps();
      acc1[r] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < head_dim; ++d) {
      const __m256 q0 = _mm256_loadu_ps(qt + d * width + c);
      const __m256 q1 = _mm256_loadu_ps(qt + d * width + c + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(keys + r * ldk + d);
        acc0[r] = _mm256_fmadd_ps(a, q0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(a, q1, acc1[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(st + r * width + c, acc0[r]);
      _mm256_storeu_ps(st + r * width + c + 8, acc1[r]);
    }
  }
}

// Rows of one KV head's keys or values as float32: in place for float32, else converted.
inline const float* head_rows(const float* src, int64_t ld, int64_t, int64_t, float*, int64_t* out_ld) {
  *out_ld = ld;
  return src;
}
inline const float* head_rows(const bf16* src, int64_t ld, int64_t n, int64_t head_dim, float* dst,
                              int64_t* out_ld) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < head_dim; d += 8) _mm256_storeu_ps(dst + j * head_dim + d, load8(src + j * ld + d));
  }
  *out_ld = head_dim;
  return dst;
}

// One task: tokens [t0, t1) of a sequence, the `group` query heads of KV head `kvh`.
// Query rows are (token, head) pairs: row r = token t0 + r / group, head kvh * group +
// r % group, padded to a multiple of 16. Keys 0 .. t1 - 1 in blocks of 64 with an online
// softmax; token t sees keys 0..t. Scores are kept keys x rows, so the softmax runs down
// columns, 8 query rows per instruction.
template <typename T>
void prefill_task(const T* q, int64_t q_row, const T* k, int64_t k_row, const T* v, int64_t v_row,
                  T* out, float* lse, int64_t heads, int64_t group, int64_t kvh, int64_t head_dim,
                  int64_t t0, int64_t t1, float scale, std::vector<float>& buf) {
  const int64_t rows = (t1 - t0) * group;
  const int64_t width = (rows + 15) / 16 * 16;
  buf.resize(head_dim * width + rows * head_dim + kKeyBlock * width + 2 * kKeyBlock * head_dim + 2 * width);
  float* qt = buf.data();                // D x width, scaled queries transposed
  float* o = qt + head_dim * width;      // rows x D, running sums
  float* st = o + rows * head_dim;       // 64 keys x width: scores, then probabilities
  float* kb = st + kKeyBlock * width;    // a key block as float32 (bfloat16 inputs)
  float* vb = kb + kKeyBlock * head_dim; // a value block as float32 (bfloat16 inputs)
  float* m = vb + kKeyBlock * head_dim;  // running max per row
  float* l = m + width;                  // running sum per row
  std::fill(qt, qt + head_dim * width, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + (t0 + r / group) * q_row + (kvh * group + r % group) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) qt[d * width + r] = to_float(qr[d]) * scale;
  }
  std::fill(o, o + rows * head_dim, 0.0f);
  std::fill(m, m + width, -std::numeric_limits<float>::infinity());
  std::fill(l, l + width, 0.0f);
  const T* k_head = k + kvh * head_dim;
  const T* v_head = v + kvh * head_dim;
  for (int64_t j0 = 0; j0 < t1; j0 += kKeyBlock) {
    const int64_t keys = std::min<int64_t>(kKeyBlock, t1 - j0);
    int64_t ldk, ldv;
    const float* kf = head_rows(k_head + j0 * k_row, k_row, keys, head_dim, kb, &ldk);
    const float* vf = head_rows(v_head + j0 * v_row, v_row, keys, head_dim, vb, &ldv);
    for (int64_t j = 0; j < keys; j += 6) {
      switch (std::min<int64_t>(6, keys - j)) {
        case 6: scores_tile<6>(kf + j * ldk, ldk, qt, width, head_dim, st + j * width); break;
        case 5: scores_tile<5>(kf + j * ldk, ldk, qt, width, head_dim, st + j * width); break;
        case 4: scores_tile<4>(kf + j * ldk, ldk, qt, width, head_dim, st + j * width); break;
        case 3: scores_tile<3>(kf + j * ldk, ldk, qt, width, head_dim, st + j * width); break;
        case 2: scores_tile<2>(kf + j * ldk, ldk, qt, width, head_dim, st + j * width); break;
        default: scores_tile<1>(kf + j * ldk, ldk, qt, width, head_dim, st + j * width); break;
      }
    }
    if (j0 + keys > t0) {  // the block reaches this task's own tokens: mask later keys
      for (int64_t j = 0; j < keys; ++j) {
        float* sj = st + j * width;
        for (int64_t r = 0; r < rows; ++r) {
          if (j0 + j > t0 + r / group) sj[r] = -std::numeric_limits<float>::infinity();
        }
      }
    }
    for (int64_t c = 0; c < width; c += 8) {  // online softmax down each column of 8 rows
      __m256 mx = _mm256_loadu_ps(m + c);
      for (int64_t j = 0; j < keys; ++j) mx = _mm256_max_ps(mx, _mm256_loadu_ps(st + j * width + c));
      // exp(old max - new max): 0 on the first block (old max -inf); padding rows stay -inf
      const __m256 old = _mm256_loadu_ps(m + c);
      const __m256 finite = _mm256_cmp_ps(mx, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
      const __m256 safe_max = _mm256_and_ps(mx, finite);
      const __m256 rescale = _mm256_and_ps(exp8(_mm256_sub_ps(old, safe_max)), finite);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < keys; ++j) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j * width + c), safe_max));
        _mm256_storeu_ps(st + j * width + c, e);
        sum = _mm256_add_ps(sum, e);
      }
      _mm256_storeu_ps(l + c, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(l + c), rescale), sum));
      _mm256_storeu_ps(m + c, mx);
      alignas(32) float rs[8];
      _mm256_store_ps(rs, rescale);
      for (int64_t i = 0; i < 8 && c + i < rows; ++i) {
        if (rs[i] != 1.0f) {
          float* orow = o + (c + i) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) orow[d] *= rs[i];
        }
      }
    }
    for (int64_t r = 0; r < rows; r += 3) {
      const int n = static_cast<int>(std::min<int64_t>(3, rows - r));
      values_block<float>(n, st + r, 1, width, keys, vf, ldv, o + r * head_dim, head_dim, head_dim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / group, h = kvh * group + r % group;
    const float inv = 1.0f / l[r];
    float* orow = o + r * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) orow[d] *= inv;
    store_row(out + (t * heads + h) * head_dim, orow, head_dim);
    if (lse) lse[t * heads + h] = m[r] + std::log(l[r]);
  }
}

template <typename T>
void prefill_attention_impl(const T* q, int64_t q_row, const T* k, int64_t k_row, const T* v,
                            int64_t v_row, T* out, float* lse, const int64_t* seqs, int64_t num_seqs,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, float scale) {
  // Tasks: (sequence, KV head, block of tokens), the longest (latest) blocks first.
  struct Task { int64_t start, t0, t1, kvh; };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t start = seqs[2 * i], length = seqs[2 * i + 1];
    for (int64_t t0 = 0; t0 < length; t0 += kPrefillTokens) {
      for (int64_t h = 0; h < kv_heads; ++h)
        tasks.push_back({start, t0, std::min<int64_t>(length, t0 + kPrefillTokens), h});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.t1 > b.t1; });
  const int64_t group = heads / kv_heads;
  const int64_t n = static_cast<int64_t>(tasks.size());
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      const Task& task = tasks[i];
      const int64_t st = task.start;
      prefill_task<T>(q + st * q_row, q_row, k + st * k_row, k_row, v + st * v_row, v_row,
                      out + st * heads * head_dim, lse ? lse + st * heads : nullptr, heads,
                      group, task.kvh, head_dim, task.t0, task.t1, scale, buf);
    }
  }
}

// out = RMSNorm(x) by rows. With a residual: residual += x first (rounded to T, as the
// model's add is) and out = RMSNorm(residual); out may then be x itself.
template <typename T>
void rms_norm_impl(const T* x, const T* weight, T* out, int64_t rows, int64_t size, float eps,
                   T* residual = nullptr) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * size;
      T* yr = out + r * size;
      if (residual != nullptr) {
        T* res = residual + r * size;
        for (int64_t i = 0; i < size; ++i) res[i] = T(to_float(res[i]) + to_float(xr[i]));
        xr = res;
      }
      float sum = 0.0f;
      for (int64_t i = 0; i < size; ++i) {
        const float v = to_float(xr[i]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(size) + eps);
      // As Hugging Face's Llama: normalise in float32, round to the input dtype, then
      // scale by the weight in that dtype.
      for (int64_t i = 0; i < size; ++i)
        yr[i] = T(to_float(T(to_float(xr[i]) * inv)) * to_float(weight[i]));
    }
  });
}

template <typename T>
void silu_and_mul_impl(const T* x, T* out, int64_t rows, int64_t size) {
  // x (rows, 2 * size) = [gate | up] -> silu(gate) * up, in float32, rounded once.
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * 2 * size;
      const T* up = gate + size;
      T* y = out + r * size;
      int64_t i = 0;
      for (; i + 8 <= size; i += 8) {
        alignas(32) float v[8];
        _mm256_store_ps(v, silu_mul8(load8(gate + i), load8(up + i)));
        for (int k = 0; k < 8; ++k) y[i + k] = T(v[k]);
      }
      for (; i < size; ++i) {
        const float g = to_float(gate[i]);
        y[i] = T(g / (1.0f + std::exp(-g)) * to_float(up[i]));
      }
    }
  });
}

template <typename T>
void rotary_impl(T* x, const T* cos, const T* sin, int64_t tokens, int64_t row_stride,
                 int64_t heads, int64_t head_dim) {
  // Rotate-half layout: pairs (j, j + half) turn by the angle of pair j.
  const int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * head_dim;
      const T* s = sin + t * head_dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + t * row_stride + h * head_dim;
        for (int64_t j = 0; j < half; ++j) {
          const float a = to_float(v[j]), b = to_float(v[j + half]);
          v[j] = T(a * to_float(c[j]) - b * to_float(s[j]));
          v[j + half] = T(b * to_float(c[j + half]) + a * to_float(s[j + half]));
        }
      }
    }
  });
}

}  // namespace

void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads) {
  // x (N, H_all, D), contiguous in its last two dims; its first ``heads`` heads rotate in
  // place. cos, sin (N, D) (any shape of N * D elements) in x's dtype.
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "rotary_: x must be (N, heads, head_dim) with contiguous rows");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary_: dtypes differ");
  auto c = cos.contiguous(), s = sin.contiguous();
  const int64_t tokens = x.size(0), head_dim = x.size(2);
  TORCH_CHECK(c.numel() == tokens * head_dim && heads <= x.size(1), "rotary_: bad shapes");
  if (x.scalar_type() == torch::kFloat32) {
    rotary_impl<float>(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), tokens,
                       x.stride(0), heads, head_dim);
  } else if (x.scalar_type() == torch::kBFloat16) {
    rotary_impl<bf16>(x.data_ptr<bf16>(), c.data_ptr<bf16>(), s.data_ptr<bf16>(), tokens,
                      x.stride(0), heads, head_dim);
  } else {
    TORCH_CHECK(false, "rotary_: float32 or bfloat16 only");
  }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: dtypes differ");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t size = x.size(-1), rows = xc.numel() / size;
  if (x.scalar_type() == torch::kFloat32) {
    rms_norm_impl<float>(xc.data_ptr<float>(), weight.contiguous().data_ptr<float>(),
                         out.data_ptr<float>(), rows, size, static_cast<float>(eps));
  } else if (x.scalar_type() == torch::kBFloat16) {
    rms_norm_impl<bf16>(xc.data_ptr<bf16>(), weight.contiguous().data_ptr<bf16>(),
                        out.data_ptr<bf16>(), rows, size, static_cast<float>(eps));
  } else {
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
  }
  return out;
}

void add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  // residual += x; x = RMSNorm(residual): the residual add fused into the next norm.
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm_: dtypes differ");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.is_contiguous() && residual.is_contiguous(),
              "add_rms_norm_: x and residual must be contiguous and of one shape");
  const int64_t size = x.size(-1), rows = x.numel() / size;
  if (x.scalar_type() == torch::kFloat32) {
    rms_norm_impl<float>(x.data_ptr<float>(), weight.contiguous().data_ptr<float>(),
                         x.data_ptr<float>(), rows, size, static_cast<float>(eps),
                         residual.data_ptr<float>());
  } else if (x.scalar_type() == torch::kBFloat16) {
    rms_norm_impl<bf16>(x.data_ptr<bf16>(), weight.contiguous().data_ptr<bf16>(),
                        x.data_ptr<bf16>(), rows, size, static_cast<float>(eps),
                        residual.data_ptr<bf16>());
  } else {
    TORCH_CHECK(false, "add_rms_norm_: float32 or bfloat16 only");
  }
}

torch::Tensor silu_and_mul(torch::Tensor x) {
  auto xc = x.contiguous();
  const int64_t size = x.size(-1) / 2, rows = xc.numel() / x.size(-1);
  auto sizes = x.sizes().vec();
  sizes.back() = size;
  auto out = torch::empty(sizes, x.options());
  if (x.scalar_type() == torch::kFloat32) {
    silu_and_mul_impl<float>(xc.data_ptr<float>(), out.data_ptr<float>(), rows, size);
  } else if (x.scalar_type() == torch::kBFloat16) {
    silu_and_mul_impl<bf16>(xc.data_ptr<bf16>(), out.data_ptr<bf16>(), rows, size);
  } else {
    TORCH_CHECK(false, "silu_and_mul: float32 or bfloat16 only");
  }
  return out;
}

std::vector<torch::Tensor> paged_decode_attention(
    torch::Tensor q, std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
    std::vector<torch::Tensor> block_tables, std::vector<torch::Tensor> kv_lens, double scale) {
  // q (B, Q, H, D); per owner j: caches (num_blocks_j, block_size, KVH, D), block_table
  // (B, NB_j) and kv_len (B,): every query of sequence b sees the first kv_len[b] slots
  // of its blocks on every owner; the result is attention over all of them.
  TORCH_CHECK(q.dim() == 4 && !k_caches.empty(), "paged_decode_attention: bad inputs");
  TORCH_CHECK(k_caches.size() == v_caches.size() && k_caches.size() == block_tables.size() &&
                  k_caches.size() == kv_lens.size(),
              "paged_decode_attention: one cache pair, table and length per owner");
  const int64_t batch = q.size(0), num_q = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const int64_t block_size = k_caches[0].size(1), kv_heads = k_caches[0].size(2);
  TORCH_CHECK(heads % kv_heads == 0 && num_q * heads <= kMaxRows,
              "paged_decode_attention: too many query rows");
  TORCH_CHECK(head_dim % 8 == 0 && head_dim <= kMaxHeadDim && block_size <= kMaxBlock,
              "paged_decode_attention: unsupported head_dim or block_size");
  std::vector<torch::Tensor> keep;  // int64 copies live until the kernel is done
  for (size_t j = 0; j < k_caches.size(); ++j) {
    const auto& k = k_caches[j];
    const auto& v = v_caches[j];
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.dim() == 4 &&
                    k.size(1) == block_size && k.size(2) == kv_heads && k.size(3) == head_dim &&
                    k.sizes() == v.sizes(),
                "paged_decode_attention: caches must be contiguous and of one shape per block");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "paged_decode_attention: dtypes differ");
    keep.push_back(block_tables[j].to(torch::kInt64).contiguous());
    keep.push_back(kv_lens[j].to(torch::kInt64).contiguous());
    TORCH_CHECK(keep[2 * j].dim() == 2 && keep[2 * j].size(0) == batch && keep[2 * j + 1].numel() == batch,
                "paged_decode_attention: a table row and a length per sequence");
  }
  auto qc = q.contiguous();
  auto out = torch::empty_like(qc);
  auto lse = torch::empty({batch, num_q, heads}, q.options().dtype(torch::kFloat32));
  const float s = static_cast<float>(scale);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    std::vector<OwnerRun<T>> owners;
    for (size_t j = 0; j < k_caches.size(); ++j) {
      owners.push_back({k_caches[j].data_ptr<T>(), v_caches[j].data_ptr<T>(),
                        keep[2 * j].data_ptr<int64_t>(), keep[2 * j].size(1),
                        keep[2 * j + 1].data_ptr<int64_t>()});
    }
    paged_decode_attention_impl<T>(qc.data_ptr<T>(), owners, out.data_ptr<T>(),
                                   lse.data_ptr<float>(), batch, num_q, heads, kv_heads,
                                   head_dim, block_size, s);
  };
  if (q.scalar_type() == torch::kFloat32) {
    launch(float{});
  } else if (q.scalar_type() == torch::kBFloat16) {
    launch(bf16{});
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only");
  }
  return {out, lse};
}

torch::Tensor pack_weight(torch::Tensor weight) {
  // weight (N, K) -> (ceil(N / 16), K, 16) in its dtype, rows past N zero.
  TORCH_CHECK(weight.dim() == 2, "pack_weight: a 2-D weight");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16,
              "pack_weight: float32 or bfloat16 only");
  const int64_t n_out = weight.size(0), k_in = weight.size(1);
  const int64_t panels = (n_out + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, k_in}, weight.options());
  padded.narrow(0, 0, n_out).copy_(weight);
  return padded.view({panels, kPanel, k_in}).transpose(1, 2).contiguous();
}

// A product's x, checked with its packed weight: its rows as float32 (x itself when it is
// float32, else a converted copy held here).
struct ProductInput {
  torch::Tensor x;
  std::vector<float> storage;
  const float* rows = nullptr;
};

ProductInput product_input(const torch::Tensor& x, const torch::Tensor& packed, const char* name) {
  TORCH_CHECK(packed.is_contiguous(), name, ": packed weight must be contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, name,
              ": float32 or bfloat16 inputs only");
  ProductInput in;
  in.x = x.contiguous();
  if (x.scalar_type() == torch::kFloat32) {
    in.rows = in.x.data_ptr<float>();
  } else {
    in.storage.resize(in.x.numel());
    const bf16* src = in.x.data_ptr<bf16>();
    for (int64_t i = 0; i < in.x.numel(); ++i) in.storage[i] = static_cast<float>(src[i]);
    in.rows = in.storage.data();
  }
  return in;
}

// launch(W{}, Y{}) with W the packed weight's element type and Y x's (the output's).
template <typename F>
void with_weight_and_output_types(const torch::Tensor& packed, const torch::Tensor& x,
                                  const char* name, F launch) {
  const bool f32_out = x.scalar_type() == torch::kFloat32;
  if (packed.scalar_type() == torch::kFloat32) {
    f32_out ? launch(float{}, float{}) : launch(float{}, bf16{});
  } else if (packed.scalar_type() == torch::kBFloat16) {
    f32_out ? launch(bf16{}, float{}) : launch(bf16{}, bf16{});
  } else {
    TORCH_CHECK(false, name, ": float32 or bfloat16 weights only");
  }
}

torch::Tensor linear_packed(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            int64_t n_out, int64_t vector_bits) {
  // x (M, K) float32 or bfloat16, packed from pack_weight of an (n_out, K) weight -> (M, n_out)
  // in x's dtype; float32 arithmetic, rounded once.
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kPanel &&
                  packed.size(1) == x.size(1) && packed.size(0) * kPanel >= n_out &&
                  packed.size(0) * kPanel < n_out + kPanel,
              "linear_packed: shapes do not match");
  TORCH_CHECK(!bias.has_value() || bias->numel() == n_out, "linear_packed: bias size");
  const bool wide = use_avx512(vector_bits, "linear_packed");
  const ProductInput in = product_input(x, packed, "linear_packed");
  const float* xf = in.rows;
  const int64_t rows = x.size(0), k_in = x.size(1);
  auto y = torch::empty({rows, n_out}, x.options());
  torch::Tensor bf;
  if (bias.has_value()) bf = bias->to(torch::kFloat32).contiguous();
  const float* b = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  with_weight_and_output_types(packed, x, "linear_packed", [&](auto weight_tag, auto out_tag) {
    using W = decltype(weight_tag);
    using Y = decltype(out_tag);
    if (wide) {
      linear_packed_impl<Avx512Tiles, W, Y>(xf, packed.data_ptr<W>(), b, y.data_ptr<Y>(), rows, n_out, k_in);
    } else {
      linear_packed_impl<Avx2Tiles, W, Y>(xf, packed.data_ptr<W>(), b, y.data_ptr<Y>(), rows, n_out, k_in);
    }
  });
  return y;
}

torch::Tensor linear_silu(torch::Tensor x, torch::Tensor packed, int64_t n_half, int64_t vector_bits) {
  // x (M, K); packed: pack_weight of the gate and of the up weight, panels interleaved
  // (2 * ceil(n_half / 16), K, 16) -> silu(x Wg^T) * (x Wu^T) (M, n_half) in x's dtype.
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kPanel &&
                  packed.size(1) == x.size(1) &&
                  packed.size(0) == 2 * ((n_half + kPanel - 1) / kPanel),
              "linear_silu: shapes do not match");
  const bool wide = use_avx512(vector_bits, "linear_silu");
  const ProductInput in = product_input(x, packed, "linear_silu");
  const float* xf = in.rows;
  const int64_t rows = x.size(0), k_in = x.size(1);
  auto y = torch::empty({rows, n_half}, x.options());
  with_weight_and_output_types(packed, x, "linear_silu", [&](auto weight_tag, auto out_tag) {
    using W = decltype(weight_tag);
    using Y = decltype(out_tag);
    if (wide) {
      linear_silu_impl<Avx512Tiles, W, Y>(xf, packed.data_ptr<W>(), y.data_ptr<Y>(), rows, n_half, k_in);
    } else {
      linear_silu_impl<Avx2Tiles, W, Y>(xf, packed.data_ptr<W>(), y.data_ptr<Y>(), rows, n_half, k_in);
    }
  });
  return y;
}

void prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor seqs,
                       double scale, torch::Tensor out, c10::optional<torch::Tensor> lse) {
  // q (N, H, D), k and v (N, KVH, D): rows may be strided views (of a fused qkv), each
  // head's D contiguous. seqs (S, 2): [first flat row, length] of each sequence, whose
  // token t attends causally to its keys 0..t. Writes out (N, H, D) contiguous, in q's dtype,
  // and lse (N, H) float32 if given, for those rows only.
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() &&
                  q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "prefill_attention: q (N, H, D), k and v (N, KVH, D)");
  const int64_t heads = q.size(1), kv_heads = k.size(1), head_dim = q.size(2);
  TORCH_CHECK(heads % kv_heads == 0, "prefill_attention: heads must be a multiple of KV heads");
  TORCH_CHECK(head_dim % 16 == 0 && head_dim <= kMaxHeadDim, "prefill_attention: head_dim");
  for (const auto& t : {q, k, v}) {
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == head_dim && t.scalar_type() == q.scalar_type(),
                "prefill_attention: heads must be contiguous rows of one dtype");
  }
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "prefill_attention: out must be a contiguous (N, H, D) of q's dtype");
  TORCH_CHECK(!lse.has_value() || (lse->is_contiguous() && lse->scalar_type() == torch::kFloat32 &&
                                   lse->numel() == q.size(0) * heads),
              "prefill_attention: lse must be a contiguous float32 (N, H)");
  auto sq = seqs.to(torch::kInt64).contiguous();
  TORCH_CHECK(sq.dim() == 2 && sq.size(1) == 2, "prefill_attention: seqs (S, 2)");
  const int64_t* sp = sq.data_ptr<int64_t>();
  for (int64_t i = 0; i < sq.size(0); ++i) {
    TORCH_CHECK(sp[2 * i] >= 0 && sp[2 * i + 1] >= 0 && sp[2 * i] + sp[2 * i + 1] <= q.size(0),
                "prefill_attention: a sequence runs past the rows");
  }
  float* lp = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == torch::kFloat32) {
    prefill_attention_impl<float>(q.data_ptr<float>(), q.stride(0), k.data_ptr<float>(), k.stride(0),
                                  v.data_ptr<float>(), v.stride(0), out.data_ptr<float>(), lp, sp,
                                  sq.size(0), heads, kv_heads, head_dim, s);
  } else if (q.scalar_type() == torch::kBFloat16) {
    prefill_attention_impl<bf16>(q.data_ptr<bf16>(), q.stride(0), k.data_ptr<bf16>(), k.stride(0),
                                 v.data_ptr<bf16>(), v.stride(0), out.data_ptr<bf16>(), lp, sp,
                                 sq.size(0), heads, kv_heads, head_dim, s);
  } else {
    TORCH_CHECK(false, "prefill_attention: float32 or bfloat16 only");
  }
}

// Every kernel runs without the GIL: they touch tensors only, and a server's event loop
// and tokenizing threads run on beside a step instead of waiting for its every kernel.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, nogil);
  m.def("pack_weight", &pack_weight, nogil);
  m.def("linear_packed", &linear_packed, nogil, py::arg("x"), py::arg("packed"), py::arg("bias"),
        py::arg("n_out"), py::arg("vector_bits") = 0);
  m.def("linear_silu", &linear_silu, nogil, py::arg("x"), py::arg("packed"), py::arg("n_half"),
        py::arg("vector_bits") = 0);
  m.def("has_avx512", &has_avx512);
  m.def("prefill_attention", &prefill_attention, nogil);
  m.def("rms_norm", &rms_norm, nogil);
  m.def("add_rms_norm_", &add_rms_norm_, nogil);
  m.def("silu_and_mul", &silu_and_mul, nogil);
  m.def("rotary_", &rotary_, nogil);
}
