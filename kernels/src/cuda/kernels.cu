// turbine CUDA kernels, compiled at run time by NVRTC for the device's architecture.
// HEAD_DIM and GROUP (query heads per KV head) are prepended as #defines by the loader, so the
// attention kernels keep their per-lane arrays in registers (compile-time sizes).
// No CUDA headers are included: bf16 is handled as raw 16-bit patterns, so NVRTC needs no
// include path.
// Storage is bf16; every reduction and accumulation is f32.

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;
// 8- and 16-byte words for wide loads.
struct __align__(8) U2 { u32 x, y; };
struct __align__(16) U4 { u32 x, y, z, w; };

// -inf without <math.h> (NVRTC has no standard headers here).
#define NEG_INF __uint_as_float(0xff800000u)
#define WARP 32
#define ATTN_WARPS 4
#define PER_LANE (HEAD_DIM / WARP)

__device__ __forceinline__ float b2f(bf16 v) { return __uint_as_float(((u32)v) << 16); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ bf16 f2b(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    float t = lane < nw ? part[lane] : 0.0f;
    return warp_sum(t);
}

// splitmix64 finaliser: the synthetic-weight hash (the host has the same function).
__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// out[i] = offset + scale * u, u uniform in [-1, 1) from hash(seed, i). Seeded, so the same
// seed gives the same weights on any device.
extern "C" __global__ void init_uniform_bf16(bf16* out, u64 n, u64 seed, float scale, float offset) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 h = mix64(seed ^ mix64(i));
        float u = __fsub_rn(__fmul_rn((float)(h >> 40), 1.0f / 8388608.0f), 1.0f);
        out[i] = f2b(__fadd_rn(offset, __fmul_rn(scale, u)));
    }
}

extern "C" __global__ void init_uniform_f32(float* out, u64 n, u64 seed, float scale, float offset) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 h = mix64(seed ^ mix64(i));
        float u = __fsub_rn(__fmul_rn((float)(h >> 40), 1.0f / 8388608.0f), 1.0f);
        out[i] = __fadd_rn(offset, __fmul_rn(scale, u));
    }
}

// x[r, :] = table[tokens[r], :] (f32 residual stream). grid: rows.
extern "C" __global__ void embed_rows(const bf16* table, const int* tokens, float* x, int hidden) {
    int r = blockIdx.x;
    const bf16* src = table + (u64)tokens[r] * hidden;
    float* dst = x + (u64)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = b2f(src[i]);
}

// If add != null: x += add (in place, f32). Then out = x / rms(x) * w (bf16). grid: rows.
extern "C" __global__ void add_rmsnorm(float* x, const bf16* add, const float* w, bf16* out,
                                       int hidden, float eps) {
    int r = blockIdx.x;
    float* xr = x + (u64)r * hidden;
    const bf16* ar = add ? add + (u64)r * hidden : 0;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = xr[i];
        if (ar) { v += b2f(ar[i]); xr[i] = v; }
        ss += v * v;
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)hidden + eps);
    bf16* o = out + (u64)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = f2b(xr[i] * inv * w[i]);
}

// y[r, c] += b[c] for a [rows, cols] block inside rows of `stride` elements.
extern "C" __global__ void add_bias(bf16* y, const float* b, int cols, int stride, int rows) {
    u64 total = (u64)rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / cols; int c = (int)(i % cols);
        bf16* p = y + r * stride + c;
        *p = f2b(b2f(*p) + b[c]);
    }
}

// Rotary embedding of the q and k heads of one row (q heads then k heads, contiguous; the
// block's threads share the pairs). angle_i = pos * ratio^i as a running f32 product (ggml's
// way; the CPU backend's too). neox: pairs (i, i + d/2); else adjacent pairs (2i, 2i+1).
__device__ __forceinline__ void rope_row(bf16* row, float p, int n_heads, int n_kv_heads,
                                         float ratio, int neox) {
    const int half = HEAD_DIM / 2;
    int total = (n_heads + n_kv_heads) * half;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        int h = idx / half, i = idx % half;
        float theta = p;
        for (int j = 0; j < i; j++) theta *= ratio;
        float c = cosf(theta), s = sinf(theta);
        bf16* base = row + h * HEAD_DIM;
        int a = neox ? i : 2 * i;
        int b = neox ? i + half : 2 * i + 1;
        float x0 = b2f(base[a]), x1 = b2f(base[b]);
        base[a] = f2b(x0 * c - x1 * s);
        base[b] = f2b(x0 * s + x1 * c);
    }
}

// Copies one row's k and v (kv_dim each, v right after k) to pool slot `slot`.
__device__ __forceinline__ void kv_copy_row(const bf16* k, u64 slot, bf16* kc, bf16* vc,
                                            int kv_dim) {
    u64 dst = slot * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kc[dst + i] = k[i];
        vc[dst + i] = k[kv_dim + i];
    }
}

// RoPE of each row of qkv. grid: rows.
extern "C" __global__ void rope_qk(bf16* qkv, const int* pos, int stride, int n_heads,
                                   int n_kv_heads, float ratio, int neox) {
    int t = blockIdx.x;
    rope_row(qkv + (u64)t * stride, (float)pos[t], n_heads, n_kv_heads, ratio, neox);
}

// rope_qk then kv_write in one launch (one block per row: the roped k is read back after a
// barrier), so a decode layer has one small kernel fewer.
extern "C" __global__ void rope_kv_write(bf16* qkv, const int* pos, const int* slots, bf16* kc,
                                         bf16* vc, int stride, int n_heads, int n_kv_heads,
                                         float ratio, int neox) {
    int t = blockIdx.x;
    bf16* row = qkv + (u64)t * stride;
    rope_row(row, (float)pos[t], n_heads, n_kv_heads, ratio, neox);
    __syncthreads();
    kv_copy_row(row + n_heads * HEAD_DIM, (u64)slots[t], kc, vc, n_kv_heads * HEAD_DIM);
}

// Writes each row's k and v (at k_off and k_off + kv_dim in the row) into the paged pool at
// slot slots[t] (= block * block_size + offset). Pool layout: [slot][kv_head][head_dim].
extern "C" __global__ void kv_write(const bf16* qkv, const int* slots, bf16* kc, bf16* vc,
                                    int stride, int k_off, int kv_dim) {
    int t = blockIdx.x;
    kv_copy_row(qkv + (u64)t * stride + k_off, (u64)slots[t], kc, vc, kv_dim);
}

// out[r, c] = silu(gu[r, c]) * gu[r, ffn + c].
extern "C" __global__ void swiglu(const bf16* gu, bf16* out, int ffn, int rows) {
    u64 total = (u64)rows * ffn;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / ffn; u64 c = i % ffn;
        float g = b2f(gu[r * 2 * ffn + c]);
        float u = b2f(gu[r * 2 * ffn + ffn + c]);
        out[i] = f2b(g / (1.0f + expf(-g)) * u);
    }
}

// Small-batch GEMV: y[r, o] = x[r, :] . w[o, :] for r < n <= GEMV_ROWS (bf16 in, f32
// accumulate; y f32 when yf is set, else bf16 into yb). One warp per output: each lane takes
// 16-byte chunks lane, lane + 32, ... of the weight row (inp % 8 == 0, rows 16-byte aligned),
// several in flight (unrolled). Off by default (TURBINE_CUDA_GEMV=1 turns it on): on the H200
// it beat cuBLAS only for one row over SmolLM2's small layer matrices (30 layers' GEMMs 1.2 ->
// 0.7 ms, eager) and lost elsewhere (8B layers at 1 row 3.9 -> 8.6 ms, at 8 rows 3.9 -> 24.5
// ms; SmolLM2 decode steps with the head GEMM on it 1.05 -> 1.33 ms). With swi != 0 the input is the SwiGLU of gate|up rows
// (x[r, k] = silu(x[r, k]) * x[r, inp + k], rounded to bf16 as the swiglu kernel does): the
// down projection reads the gate/up output directly, one launch fewer per layer.
// grid: ceil(out / 8), block 256.
#define GEMV_ROWS 8
__device__ __forceinline__ void unpack8(const U4& v, float* f) {
    f[0] = __uint_as_float(v.x << 16); f[1] = __uint_as_float(v.x & 0xffff0000u);
    f[2] = __uint_as_float(v.y << 16); f[3] = __uint_as_float(v.y & 0xffff0000u);
    f[4] = __uint_as_float(v.z << 16); f[5] = __uint_as_float(v.z & 0xffff0000u);
    f[6] = __uint_as_float(v.w << 16); f[7] = __uint_as_float(v.w & 0xffff0000u);
}

extern "C" __global__ void __launch_bounds__(256)
gemv_xwt(const bf16* x, int ldx, const bf16* w, float* yf, bf16* yb, int ldy, int n, int out,
         int inp, int swi) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int o = blockIdx.x * 8 + warp;
    if (o >= out) return;
    const U4* wr = (const U4*)(w + (u64)o * inp);
    const int chunks = inp >> 3;
    float acc[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
#pragma unroll 4
    for (int c = lane; c < chunks; c += WARP) {
        float wf[8];
        unpack8(wr[c], wf);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (r < n) {
                const bf16* xr = x + (u64)r * ldx;
                float xf[8];
                unpack8(((const U4*)xr)[c], xf);
                if (swi) {
                    float uf[8];
                    unpack8(((const U4*)(xr + inp))[c], uf);
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        float g = xf[j];
                        xf[j] = b2f(f2b(g / (1.0f + expf(-g)) * uf[j]));
                    }
                }
#pragma unroll
                for (int j = 0; j < 8; j++) acc[r] += wf[j] * xf[j];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r < n) {
            float v = warp_sum(acc[r]);
            if (lane == 0) {
                if (yf) yf[(u64)r * ldy + o] = v; else yb[(u64)r * ldy + o] = f2b(v);
            }
        }
    }
}

// dst[i, :] = src[rows[i], :].
extern "C" __global__ void gather_rows(const bf16* src, const int* rows, bf16* dst, int cols) {
    int i = blockIdx.x;
    const bf16* s = src + (u64)rows[i] * cols;
    bf16* d = dst + (u64)i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}

// Keys each attention warp loads before scoring them (registers: 2 * ATTN_UNROLL * PER_LANE
// floats); the loader may set it (TURBINE_ATTN_UNROLL). 1, one key at a time: 4 measured
// slower on the H200 (SmolLM2 1-row decode 1.05 -> 1.15 ms, 8B batch 32 8.4 -> 10.0 ms), so
// the loop is not bound by load latency.
#ifndef ATTN_UNROLL
#define ATTN_UNROLL 1
#endif


// A lane's PER_LANE consecutive bf16 (aligned to PER_LANE * 2 bytes) widened to f32, in
// loads of 4 bytes or more instead of one 2-byte load per value.
__device__ __forceinline__ void load_lane(const bf16* src, float* dst) {
#if PER_LANE % 4 == 0
#pragma unroll
    for (int j = 0; j < PER_LANE; j += 4) {
        U2 w = *(const U2*)(src + j);
        dst[j] = __uint_as_float(w.x << 16); dst[j + 1] = __uint_as_float(w.x & 0xffff0000u);
        dst[j + 2] = __uint_as_float(w.y << 16); dst[j + 3] = __uint_as_float(w.y & 0xffff0000u);
    }
#elif PER_LANE % 2 == 0
#pragma unroll
    for (int j = 0; j < PER_LANE; j += 2) {
        u32 w = *(const u32*)(src + j);
        dst[j] = __uint_as_float(w << 16); dst[j + 1] = __uint_as_float(w & 0xffff0000u);
    }
#else
#pragma unroll
    for (int j = 0; j < PER_LANE; j++) dst[j] = b2f(src[j]);
#endif
}

// Paged attention, one split of the context: block (kv_head, query token, split). Each of
// ATTN_WARPS warps walks keys split_start + warp, + ATTN_WARPS, ...; a lane owns PER_LANE
// consecutive dims of each of the GROUP query heads that share this KV head (so a K/V row is
// read once for the whole group). Online softmax per warp, merged across warps in shared
// memory; the split's unnormalised output and (max, sum) go to part_o / part_ml for
// attn_combine (with a single split the normalised output goes straight to `out`).
// Causal: token t sees positions 0..=tok_pos[t].
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * WARP)
attn_split(const bf16* q, int q_stride, const bf16* kc, const bf16* vc, const int* block_tables,
           const int* tok_seq, const int* tok_pos, const int* seq_bt_off, int block_size,
           int split_len, int max_splits, int n_kv_heads, float scale, float* part_o,
           float* part_ml, bf16* out) {
    const int kvh = blockIdx.x, t = blockIdx.y, sp = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n_heads = n_kv_heads * GROUP;
    const int ctx = tok_pos[t] + 1;
    const int start = sp * split_len;
    const int end = min(ctx, start + split_len);
    const int* table = block_tables + seq_bt_off[tok_seq[t]];
    const int kv_dim = n_kv_heads * HEAD_DIM;

    float qr[GROUP][PER_LANE], acc[GROUP][PER_LANE], m[GROUP], l[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        const bf16* qh = q + (u64)t * q_stride + (kvh * GROUP + g) * HEAD_DIM + lane * PER_LANE;
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) { qr[g][j] = b2f(qh[j]) * scale; acc[g][j] = 0.0f; }
        m[g] = NEG_INF; l[g] = 0.0f;
    }
    // ATTN_UNROLL keys per warp are loaded before any is used (the loads do not depend on the
    // softmax state); each warp visits its keys in the same order whatever ATTN_UNROLL is, so
    // the arithmetic does not change with it.
    for (int p0 = start + warp; p0 < end; p0 += ATTN_WARPS * ATTN_UNROLL) {
        float k[ATTN_UNROLL][PER_LANE], v[ATTN_UNROLL][PER_LANE];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            int p = p0 + u * ATTN_WARPS;
            if (p < end) {
                int blk = table[p / block_size];
                u64 off = ((u64)blk * block_size + (p % block_size)) * kv_dim + kvh * HEAD_DIM + lane * PER_LANE;
                load_lane(kc + off, k[u]);
                load_lane(vc + off, v[u]);
            } else {
#pragma unroll
                for (int j = 0; j < PER_LANE; j++) { k[u][j] = 0.0f; v[u][j] = 0.0f; }
            }
        }
        // Every score first (independent warp sums, which interleave), then the serial
        // online-softmax updates in key order.
        float sc[ATTN_UNROLL][GROUP];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
#pragma unroll
            for (int g = 0; g < GROUP; g++) {
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < PER_LANE; j++) s += qr[g][j] * k[u][j];
                sc[u][g] = warp_sum(s);
            }
        }
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            if (p0 + u * ATTN_WARPS >= end) break;
#pragma unroll
            for (int g = 0; g < GROUP; g++) {
                float s = sc[u][g];
                float mn = fmaxf(m[g], s);
                float corr = expf(m[g] - mn);
                float pe = expf(s - mn);
                l[g] = l[g] * corr + pe;
#pragma unroll
                for (int j = 0; j < PER_LANE; j++) acc[g][j] = acc[g][j] * corr + pe * v[u][j];
                m[g] = mn;
            }
        }
    }
    __shared__ float sm_m[ATTN_WARPS][GROUP], sm_l[ATTN_WARPS][GROUP];
    __shared__ float sm_acc[ATTN_WARPS][GROUP][HEAD_DIM];
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) sm_acc[warp][g][lane * PER_LANE + j] = acc[g][j];
    }
    __syncthreads();
    // Threads split the (group, dim) outputs of the merge.
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += blockDim.x) {
        int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float M = NEG_INF;
        for (int w = 0; w < ATTN_WARPS; w++) M = fmaxf(M, sm_m[w][g]);
        float L = 0.0f, o = 0.0f;
        if (M != NEG_INF) {
            for (int w = 0; w < ATTN_WARPS; w++) {
                float e = sm_m[w][g] == NEG_INF ? 0.0f : expf(sm_m[w][g] - M);
                L += sm_l[w][g] * e;
                o += sm_acc[w][g][d] * e;
            }
        }
        int h = kvh * GROUP + g;
        if (max_splits == 1) {
            // One split: this is the whole softmax, so no attn_combine launch.
            out[(u64)t * n_heads * HEAD_DIM + h * HEAD_DIM + d] = f2b(o / L);
            continue;
        }
        u64 base = ((u64)t * n_heads + h) * max_splits + sp;
        part_o[base * HEAD_DIM + d] = o;
        if (d == 0) { part_ml[base * 2] = M; part_ml[base * 2 + 1] = L; }
    }
}

// Merges the splits of attn_split into out[t, h * HEAD_DIM + d] (bf16). grid (tokens, heads),
// block HEAD_DIM threads.
extern "C" __global__ void attn_combine(const float* part_o, const float* part_ml, const int* tok_pos,
                                        int split_len, int max_splits, int n_heads, bf16* out) {
    int t = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    int nsplit = min(max_splits, (tok_pos[t] + split_len) / split_len);
    u64 base = ((u64)t * n_heads + h) * max_splits;
    float M = NEG_INF;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, part_ml[(base + s) * 2]);
    float L = 0.0f, o = 0.0f;
    for (int s = 0; s < nsplit; s++) {
        float ms = part_ml[(base + s) * 2];
        if (ms == NEG_INF) continue;
        float e = expf(ms - M);
        L += part_ml[(base + s) * 2 + 1] * e;
        o += part_o[(base + s) * HEAD_DIM + d] * e;
    }
    out[(u64)t * n_heads * HEAD_DIM + h * HEAD_DIM + d] = f2b(o / L);
}

// Index of the largest value of each row (lowest index on ties; NaN counts as -inf).
// grid: rows, block 1024.
extern "C" __global__ void argmax_rows(const float* x, int cols, int* out) {
    __shared__ float sv[1024];
    __shared__ int si[1024];
    const float* r = x + (u64)blockIdx.x * cols;
    float best = NEG_INF; int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = r[c];
        if (v > best) { best = v; bi = c; }
    }
    sv[threadIdx.x] = best; si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = sv[threadIdx.x + s]; int oi = si[threadIdx.x + s];
            if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
                sv[threadIdx.x] = ov; si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = si[0] == 0x7fffffff ? 0 : si[0];
}

// ---- Prefill attention on tensor cores ----------------------------------------------------
// mma.sync m16n8k16 (bf16 operands, f32 accumulators). Fragment layouts (PTX ISA): lane l,
// g = l / 4, c = 2 * (l % 4). A 16x16 (row): regs {A[g][c..c+1], A[g+8][c..], A[g][c+8..],
// A[g+8][c+8..]}. B 16x8 (col): regs {B[c..c+1][g], B[c+8..c+9][g]}. C 16x8: {C[g][c],
// C[g][c+1], C[g+8][c], C[g+8][c+1]}. Lower 16 bits hold the lower index.
#define FA_KEYS (HEAD_DIM <= 128 ? 64 : 32)
#define FA_KPAD (HEAD_DIM + 8)


__device__ __forceinline__ void mma_bf16_16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f2b(lo) | ((u32)f2b(hi) << 16);
}

// Causal attention for prefill tiles: block (tile, query head). A tile is up to 16 * WARPS
// consecutive query tokens of ONE sequence (tiles[3i] = first row, [3i+1] = rows, [3i+2] =
// sequence); each of the WARPS warps owns 16 of its rows (more warps: each K/V tile serves
// more rows). Q fragments stay in registers; K
// and V (both row-major; P.V's B fragments come from ldmatrix .trans) tiles of FA_KEYS
// positions are gathered through the block table into shared memory, read once per block
// instead of once per query token as in attn_split. Online softmax in base 2 (scale_log2 =
// log2(e) / sqrt(HEAD_DIM)); P is rounded to bf16 for the P.V product. Row t sees keys
// 0..=tok_pos[t]; the last row's position bounds the tile's keys.
template <int WARPS>
__device__ __forceinline__ void
attn_prefill_impl(const bf16* q, int q_stride, const bf16* kc, const bf16* vc, const int* block_tables,
                  const int* tiles, int n_tiles, const int* tok_pos, const int* seq_bt_off,
                  int block_size, int n_kv_heads, float scale_log2, bf16* out) {
    __shared__ __align__(16) bf16 sk[FA_KEYS][FA_KPAD];
    __shared__ __align__(16) bf16 sv[FA_KEYS][FA_KPAD];
    // Heaviest tiles (latest rows: most keys) first, so the grid's tail is short.
    const int tile = n_tiles - 1 - (int)blockIdx.x, h = blockIdx.y;
    const int kvh = h / GROUP;
    const int n_heads = n_kv_heads * GROUP;
    const int row0 = tiles[tile * 3], nrows = tiles[tile * 3 + 1];
    const int* table = block_tables + seq_bt_off[tiles[tile * 3 + 2]];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c2 = (lane & 3) * 2;
    const int kv_dim = n_kv_heads * HEAD_DIM;
    const int wr = warp * 16;
    const bool active = wr < nrows;
    // This thread's rows (g and g + 8 of the warp's 16), clamped into the tile: clamped rows
    // compute a duplicate that is never written.
    const int ra = min(wr + g, nrows - 1), rb = min(wr + g + 8, nrows - 1);
    const int pa = tok_pos[row0 + ra], pb = tok_pos[row0 + rb];
    const int warp_last = tok_pos[row0 + min(wr + 15, nrows - 1)];
    const int kv_len = tok_pos[row0 + nrows - 1] + 1;

    u32 qf[HEAD_DIM / 16][4];
    {
        const bf16* qa = q + (u64)(row0 + ra) * q_stride + h * HEAD_DIM + c2;
        const bf16* qb = q + (u64)(row0 + rb) * q_stride + h * HEAD_DIM + c2;
#pragma unroll
        for (int k = 0; k < HEAD_DIM / 16; k++) {
            qf[k][0] = *(const u32*)(qa + k * 16);
            qf[k][1] = *(const u32*)(qb + k * 16);
            qf[k][2] = *(const u32*)(qa + k * 16 + 8);
            qf[k][3] = *(const u32*)(qb + k * 16 + 8);
        }
    }
    float o[HEAD_DIM / 8][4];
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; d++) { o[d][0] = 0.0f; o[d][1] = 0.0f; o[d][2] = 0.0f; o[d][3] = 0.0f; }
    float ma = NEG_INF, mb = NEG_INF, la = 0.0f, lb = 0.0f;

    for (int k0 = 0; k0 < kv_len; k0 += FA_KEYS) {
        __syncthreads();  // the previous tile is consumed
        // K and V: 16-byte chunks, dims fastest (coalesced rows), row-major in shared memory.
        for (int i = threadIdx.x; i < FA_KEYS * (HEAD_DIM / 8); i += WARPS * WARP) {
            int kr = i / (HEAD_DIM / 8), d8 = (i % (HEAD_DIM / 8)) * 8;
            int p = k0 + kr;
            U4 k4 = {0u, 0u, 0u, 0u}, v4 = {0u, 0u, 0u, 0u};
            if (p < kv_len) {
                int blk = table[p / block_size];
                u64 off = ((u64)blk * block_size + p % block_size) * kv_dim + kvh * HEAD_DIM + d8;
                k4 = *(const U4*)(kc + off);
                v4 = *(const U4*)(vc + off);
            }
            *(U4*)&sk[kr][d8] = k4;
            *(U4*)&sv[kr][d8] = v4;
        }
        __syncthreads();
        if (!active || k0 > warp_last) continue;

        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < FA_KEYS / 8; n++) {
            s[n][0] = 0.0f; s[n][1] = 0.0f; s[n][2] = 0.0f; s[n][3] = 0.0f;
#pragma unroll
            for (int k = 0; k < HEAD_DIM / 16; k++) {
                u32 b0 = *(const u32*)&sk[n * 8 + g][k * 16 + c2];
                u32 b1 = *(const u32*)&sk[n * 8 + g][k * 16 + 8 + c2];
                mma_bf16_16816(s[n], qf[k], b0, b1);
            }
        }
        float xa = NEG_INF, xb = NEG_INF;
#pragma unroll
        for (int n = 0; n < FA_KEYS / 8; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int key = k0 + n * 8 + c2 + e;
                s[n][e] = key <= pa ? s[n][e] * scale_log2 : NEG_INF;
                s[n][2 + e] = key <= pb ? s[n][2 + e] * scale_log2 : NEG_INF;
                xa = fmaxf(xa, s[n][e]);
                xb = fmaxf(xb, s[n][2 + e]);
            }
        }
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 1));
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 2));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 1));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 2));
        // Key 0 is in every row's first tile, so the running max is finite from then on.
        const float na = fmaxf(ma, xa), nb = fmaxf(mb, xb);
        const float ca = exp2f(ma - na), cb = exp2f(mb - nb);
        ma = na; mb = nb;
        float sa = 0.0f, sb = 0.0f;
#pragma unroll
        for (int n = 0; n < FA_KEYS / 8; n++) {
            s[n][0] = exp2f(s[n][0] - na); s[n][1] = exp2f(s[n][1] - na);
            s[n][2] = exp2f(s[n][2] - nb); s[n][3] = exp2f(s[n][3] - nb);
            sa += s[n][0] + s[n][1];
            sb += s[n][2] + s[n][3];
        }
        la = la * ca + sa;
        lb = lb * cb + sb;
#pragma unroll
        for (int d = 0; d < HEAD_DIM / 8; d++) { o[d][0] *= ca; o[d][1] *= ca; o[d][2] *= cb; o[d][3] *= cb; }
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; kk++) {
            u32 pf[4];
            pf[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pf[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pf[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int d = 0; d < HEAD_DIM / 8; d++) {
                // B[key][dim] fragments straight from row-major V: ldmatrix .trans, lanes 0-7
                // address keys kk*16 + 0..7, lanes 8-15 keys kk*16 + 8..15, at dims d*8.
                u32 b0, b1;
                u32 addr = smem_addr(&sv[kk * 16 + (lane & 15)][d * 8]);
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                             : "=r"(b0), "=r"(b1)
                             : "r"(addr));
                mma_bf16_16816(o[d], pf, b0, b1);
            }
        }
    }
    if (!active) return;
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    const float ia = 1.0f / la, ib = 1.0f / lb;
    const u64 row_stride = (u64)n_heads * HEAD_DIM;
    bf16* oa = out + (u64)(row0 + wr + g) * row_stride + h * HEAD_DIM + c2;
    bf16* ob = out + (u64)(row0 + wr + g + 8) * row_stride + h * HEAD_DIM + c2;
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; d++) {
        if (wr + g < nrows) *(u32*)(oa + d * 8) = pack_bf16(o[d][0] * ia, o[d][1] * ia);
        if (wr + g + 8 < nrows) *(u32*)(ob + d * 8) = pack_bf16(o[d][2] * ib, o[d][3] * ib);
    }
}

#define ATTN_PREFILL_ARGS                                                                       \
    const bf16 *q, int q_stride, const bf16 *kc, const bf16 *vc, const int *block_tables,       \
        const int *tiles, int n_tiles, const int *tok_pos, const int *seq_bt_off, int block_size, \
        int n_kv_heads, float scale_log2, bf16 *out
#define ATTN_PREFILL_PASS \
    q, q_stride, kc, vc, block_tables, tiles, n_tiles, tok_pos, seq_bt_off, block_size, n_kv_heads, scale_log2, out

// 64-row tiles (4 warps) and 128-row tiles (8 warps).
extern "C" __global__ void __launch_bounds__(128) attn_prefill(ATTN_PREFILL_ARGS) {
    attn_prefill_impl<4>(ATTN_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attn_prefill_wide(ATTN_PREFILL_ARGS) {
    attn_prefill_impl<8>(ATTN_PREFILL_PASS);
}

// ---- Sampling on the device ----------------------------------------------------------------
// One block of SAMPLE_THREADS per logits row: the same transforms as kernels/src/sampling.rs
// (repetition penalty on the raw logits; unless greedy, temperature, top-k, top-p, min-p and a
// draw), with only the token id (and requested logprobs) written out. Every reduction runs in
// a fixed order and every sum of probability mass is an integer (fixed point, 2^40 for the most
// likely token), so a seed gives the same token on every run.
// Candidates are ordered by (scaled logit desc, id asc), as on the host: the 64-bit rank
// (order_key(value) << 32 | ~id) is distinct per token, so "the k-th most likely" is one rank.
#define SAMPLE_THREADS 1024
#define SAMPLE_PARAMS 10
#define SAMPLE_MAX_TOP 20
#define SAMPLE_OUT (3 + 2 * SAMPLE_MAX_TOP)
#define MASS_ONE 1099511627776.0f

// Order-preserving map of a float to u32 (NaN lowest, like a value that is never chosen).
__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ u64 rank_of(float v, int i) {
    return ((u64)order_key(v) << 32) | (u64)(~(u32)i);
}
__device__ __forceinline__ bool finite_f(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ u64 mass_of(float s, float smax) {
    return __float2ull_rz(__expf(s - smax) * MASS_ONE);
}

__device__ u64 block_max_u64(u64 v) {
    __shared__ u64 part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) { u64 w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) { u64 w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    return v;
}

__device__ u64 block_sum_u64(u64 v) {
    __shared__ u64 part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ double block_sum_f64(double v) {
    __shared__ double part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive prefix sum over the block, in thread order.
__device__ u64 block_exclusive_scan_u64(u64 v) {
    __shared__ u64 part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 w = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += w;
    }
    __syncthreads();
    if (lane == 31) part[warp] = inc;
    __syncthreads();
    u64 before = 0;
    for (int w = 0; w < warp; w++) before += part[w];
    return before + inc - v;
}

// The candidates of one row: finite values of w, scaled by 1/temp, with rank >= floor_r.
struct Cands {
    const float* w;
    int vocab;
    float temp, smax;
    u64 floor_r;
};

// Total weight (count, or mass) of the candidates whose rank is >= x.
__device__ u64 weight_from(const Cands& c, u64 x, bool by_mass) {
    u64 acc = 0;
    for (int i = threadIdx.x; i < c.vocab; i += blockDim.x) {
        float v = c.w[i];
        if (!finite_f(v)) continue;
        float s = v / c.temp;
        u64 r = rank_of(s, i);
        if (r < c.floor_r || r < x) continue;
        acc += by_mass ? mass_of(s, c.smax) : 1ull;
    }
    return block_sum_u64(acc);
}

// The rank of the candidate at which the weight summed most likely first reaches `target`
// (>= 1, at most the candidates' total): bisection on the value key, then on the id among
// equal values. Deterministic: every step is an integer block sum.
__device__ u64 select_rank(const Cands& c, u64 target, bool by_mass, u32 kmax) {
    u32 lo = 0, hi = kmax;
    while (lo < hi) {
        u32 mid = lo + (hi - lo + 1) / 2;
        if (weight_from(c, (u64)mid << 32, by_mass) >= target) lo = mid; else hi = mid - 1;
    }
    u64 base = (u64)lo << 32;
    u32 llo = ~(u32)(c.vocab - 1), lhi = 0xffffffffu;
    while (llo < lhi) {
        u32 mid = llo + (u32)(((u64)lhi - llo + 1) / 2);
        if (weight_from(c, base | mid, by_mass) >= target) llo = mid; else lhi = mid - 1;
    }
    return base | llo;
}

// params (SAMPLE_PARAMS i32 per row): temperature (f32 bits), top_k, top_p (f32), min_p (f32),
// repetition penalty (f32), seed lo, seed hi, logprobs (-1: none, else top-n count <= 20),
// history offset, history length (distinct token ids in `hist`). `work`: [rows, vocab] f32
// scratch for penalised rows. out (SAMPLE_OUT i32 per row): token (-1: no finite logit),
// logprob (f32 bits), n, n top ids, n top logprobs (f32 bits). grid: rows.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* logits, float* work, int vocab, const int* params, const int* hist, int* out) {
    const int row = blockIdx.x, tid = threadIdx.x;
    const float* raw = logits + (u64)row * vocab;
    const int* p = params + row * SAMPLE_PARAMS;
    const float temp = __int_as_float(p[0]);
    const int top_k = p[1];
    const float top_p = __int_as_float(p[2]), min_p = __int_as_float(p[3]);
    const float pen = __int_as_float(p[4]);
    const u64 seed = (u64)(u32)p[5] | ((u64)(u32)p[6] << 32);
    const int n_lp = p[7], h_off = p[8], h_len = p[9];
    int* o = out + row * SAMPLE_OUT;
    __shared__ int s_token;

    // Finite count, and the raw logits' max over finite values (for log-softmax).
    u64 fin = 0, best_fin = 0;
    for (int i = tid; i < vocab; i += blockDim.x) {
        float v = raw[i];
        if (finite_f(v)) {
            fin++;
            u64 r = rank_of(v, i);
            best_fin = r > best_fin ? r : best_fin;
        }
    }
    fin = block_sum_u64(fin);
    if (fin == 0) {
        if (tid == 0) { o[0] = -1; o[1] = 0; o[2] = 0; }
        return;
    }
    best_fin = block_max_u64(best_fin);
    float log_z = 0.0f;
    if (n_lp >= 0) {
        const float mx = raw[~(u32)best_fin];
        double s = 0.0;
        for (int i = tid; i < vocab; i += blockDim.x) {
            float v = raw[i];
            if (finite_f(v)) s += exp((double)(v - mx));
        }
        s = block_sum_f64(s);
        log_z = mx + (float)log(s);
        // The n most likely raw logits, one block-wide max per place.
        u64 prev = 0xffffffffffffffffull;
        const int n = min(n_lp, min(SAMPLE_MAX_TOP, vocab));
        for (int j = 0; j < n; j++) {
            u64 b = 0;
            for (int i = tid; i < vocab; i += blockDim.x) {
                u64 r = rank_of(raw[i], i);
                if (r < prev && r > b) b = r;
            }
            b = block_max_u64(b);
            prev = b;
            if (tid == 0) {
                int id = (int)~(u32)b;
                o[3 + j] = id;
                o[3 + SAMPLE_MAX_TOP + j] = __float_as_int(raw[id] - log_z);
            }
        }
        if (tid == 0) o[2] = n;
    } else if (tid == 0) {
        o[2] = 0;
    }

    // Repetition penalty on a copy of the row (the raw row still serves the logprobs).
    const float* w = raw;
    if (pen != 1.0f && h_len > 0) {
        float* wr = work + (u64)row * vocab;
        for (int i = tid; i < vocab; i += blockDim.x) wr[i] = raw[i];
        __syncthreads();
        for (int j = tid; j < h_len; j += blockDim.x) {
            int t = hist[h_off + j];
            if (t >= 0 && t < vocab) {
                float v = wr[t];
                wr[t] = v > 0.0f ? v / pen : v * pen;
            }
        }
        __syncthreads();
        w = wr;
    }

    int token;
    if (temp == 0.0f || top_k == 1) {
        // Greedy: the largest value (NaN never), lowest id on ties.
        u64 b = 0;
        for (int i = tid; i < vocab; i += blockDim.x) {
            u64 r = rank_of(w[i], i);
            b = r > b ? r : b;
        }
        b = block_max_u64(b);
        token = (int)~(u32)b;
    } else {
        u64 b = 0;
        for (int i = tid; i < vocab; i += blockDim.x) {
            float v = w[i];
            if (finite_f(v)) {
                u64 r = rank_of(v / temp, i);
                b = r > b ? r : b;
            }
        }
        b = block_max_u64(b);
        const int top = (int)~(u32)b;
        Cands c = {w, vocab, temp, w[top] / temp, 0ull};
        const u32 kmax = (u32)(b >> 32);
        if (top_k > 0 && (u64)top_k < fin) c.floor_r = select_rank(c, (u64)top_k, false, kmax);
        if (top_p < 1.0f) {
            u64 total = weight_from(c, 0ull, true);
            u64 target = (u64)((double)top_p * (double)total);
            target = target < 1ull ? 1ull : target;
            c.floor_r = select_rank(c, target, true, kmax);
        }
        // min-p, then the draw over the kept candidates in id order (each thread a contiguous
        // run of ids): the distribution of the host sampler, not its random stream.
        const float min_e = min_p;
        const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
        const int i0 = tid * chunk, i1 = min(vocab, i0 + chunk);
        u64 local = 0;
        for (int i = i0; i < i1; i++) {
            float v = w[i];
            if (!finite_f(v)) continue;
            float s = v / temp;
            if (rank_of(s, i) < c.floor_r) continue;
            float e = __expf(s - c.smax);
            if (min_e > 0.0f && e < min_e && i != top) continue;
            local += mass_of(s, c.smax);
        }
        u64 before = block_exclusive_scan_u64(local);
        u64 kept = block_sum_u64(local);
        if (tid == 0) s_token = top;
        __syncthreads();
        u64 h = mix64(seed);
        double u = (double)(h >> 11) * (1.0 / 9007199254740992.0);
        u64 r = (u64)(u * (double)kept);
        if (r >= kept) r = kept - 1;
        if (kept > 0 && r >= before && r < before + local) {
            u64 acc = before;
            for (int i = i0; i < i1; i++) {
                float v = w[i];
                if (!finite_f(v)) continue;
                float s = v / temp;
                if (rank_of(s, i) < c.floor_r) continue;
                float e = __expf(s - c.smax);
                if (min_e > 0.0f && e < min_e && i != top) continue;
                acc += mass_of(s, c.smax);
                if (r < acc) { s_token = i; break; }
            }
        }
        __syncthreads();
        token = s_token;
    }
    if (tid == 0) {
        o[0] = token;
        o[1] = __float_as_int(n_lp >= 0 ? raw[token] - log_z : 0.0f);
    }
}

// KV blocks moved off the compute stream (kv_copy.rs): segment s copies seg_words 16-byte words
// from pairs[2s] to pairs[2s + 1] (device addresses, 16-byte aligned). One pass, every byte read
// once and written once like a device memcpy; four loads in flight per thread.
extern "C" __global__ void copy_segments(const u64* pairs, int n, int seg_words) {
    int step = blockDim.x;
    for (int s = blockIdx.x; s < n; s += gridDim.x) {
        const U4* src = (const U4*)pairs[2 * s];
        U4* dst = (U4*)pairs[2 * s + 1];
        int w = threadIdx.x;
        for (; w + 3 * step < seg_words; w += 4 * step) {
            U4 a = src[w], b = src[w + step], c = src[w + 2 * step], d = src[w + 3 * step];
            dst[w] = a;
            dst[w + step] = b;
            dst[w + 2 * step] = c;
            dst[w + 3 * step] = d;
        }
        for (; w < seg_words; w += step) dst[w] = src[w];
    }
}

// ---- The vision tower (cuda/vision): SigLIP encoder + Idefics3 connector over a batch of
// square tiles. Every tile has all n = side * side patches, in row-major order; activation rows
// are tile-major (row r = t * n + patch). None of these depends on HEAD_DIM or GROUP.

// Max over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_max(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    float t = lane < nw ? part[lane] : NEG_INF;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

// im2col of the patch convolution (kernel = stride = patch): tiles [T, C, S, S] f32 ->
// patches [T * side * side, C * P * P] bf16 (side = S / P). Output (r, k) with
// r = t * side^2 + py * side + px and k = (ch * P + y) * P + x holds tiles[t, ch, py * P + y,
// px * P + x]: k runs over the conv weight [hidden, C, P, P] flattened, so the embedding is a
// GEMM with that weight as a [hidden, C * P * P] matrix. Grid-stride over the outputs.
extern "C" __global__ void vis_im2col(const float* tiles, bf16* patches, int n_tiles,
                                      int channels, int image, int patch) {
    const int side = image / patch;
    const u64 cells = (u64)side * side;
    const u64 cols = (u64)channels * patch * patch;
    const u64 total = (u64)n_tiles * cells * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cols;
        const int k = (int)(i % cols);
        const u64 t = r / cells;
        const int cell = (int)(r % cells);
        const int py = cell / side, px = cell % side;
        const int ch = k / (patch * patch), rem = k % (patch * patch);
        const int y = rem / patch, x = rem % patch;
        const u64 src = ((t * channels + ch) * image + (u64)(py * patch + y)) * image + (u64)(px * patch + x);
        patches[i] = f2b(tiles[src]);
    }
}

// x[r, c] += bias[c] + pos[r % n, c] (f32, [rows, hidden]): the patch convolution's bias and
// the position embedding of patch r % n. Grid-stride.
extern "C" __global__ void vis_embed_add(float* x, const float* bias, const float* pos, int rows,
                                         int hidden, int n) {
    const u64 total = (u64)rows * hidden;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / hidden;
        const int c = (int)(i % hidden);
        x[i] += bias[c] + pos[(r % (u64)n) * hidden + c];
    }
}

// The residual add then LayerNorm of one row of x (f32, [rows, hidden]): if add is set,
// x += add + add_bias (add f32 [rows, hidden], add_bias f32 [hidden] or null), written back;
// then out = (x - mean) * rsqrt(var + eps) * w + b in bf16, mean and biased variance over the
// row in two passes (torch's LayerNorm). Each thread re-reads only the elements it wrote, so
// the passes need no barrier beyond the reductions'. grid: rows; block: a multiple of 32.
extern "C" __global__ void vis_add_layernorm(float* x, const float* add, const float* add_bias,
                                             const float* w, const float* b, bf16* out,
                                             int hidden, float eps) {
    const u64 r = blockIdx.x;
    float* xr = x + r * hidden;
    const float* ar = add ? add + r * hidden : 0;
    float s = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = xr[i];
        if (ar) {
            v += ar[i] + (add_bias ? add_bias[i] : 0.0f);
            xr[i] = v;
        }
        s += v;
    }
    const float mean = block_sum(s) / (float)hidden;
    float q = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float d = xr[i] - mean;
        q += d * d;
    }
    const float inv = rsqrtf(block_sum(q) / (float)hidden + eps);
    bf16* o = out + r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = f2b((xr[i] - mean) * inv * w[i] + b[i]);
}

// out[r, c] = act(y[r, c] + b[c]) in bf16, for f32 y [rows, cols]: the bias of a GEMM's output,
// then GELU's tanh approximation (gelu_pytorch_tanh) when gelu != 0, else nothing. Grid-stride.
extern "C" __global__ void vis_bias_act(const float* y, const float* b, bf16* out, int rows,
                                        int cols, int gelu) {
    const u64 total = (u64)rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        float v = y[i] + b[(int)(i % cols)];
        if (gelu) v = 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
        out[i] = f2b(v);
    }
}

// Softmax of each row of f32 scores s [rows, cols] (already scaled) into bf16 probabilities p
// (same shape). grid: rows; block: a multiple of 32.
extern "C" __global__ void vis_softmax_rows(const float* s, bf16* p, int cols) {
    const u64 r = blockIdx.x;
    const float* sr = s + r * cols;
    bf16* pr = p + r * cols;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, sr[i]);
    m = block_max(m);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) sum += expf(sr[i] - m);
    const float inv = 1.0f / block_sum(sum);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) pr[i] = f2b(expf(sr[i] - m) * inv);
}
