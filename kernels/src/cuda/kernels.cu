// turbine CUDA kernels, compiled at run time by NVRTC for the device's architecture.
// HEAD_DIM and GROUP (query heads per KV head) are prepended as #defines by the loader, so the
// attention kernels keep their per-lane arrays in registers (compile-time sizes).
// No CUDA headers are included: bf16 is handled as raw 16-bit patterns, so NVRTC needs no
// include path.
// Storage is bf16; every reduction and accumulation is f32.

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

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

// Rotary embedding of the q and k heads of each row of qkv (q heads then k heads, contiguous).
// angle_i = pos * ratio^i as a running f32 product (ggml's way; the CPU backend's too).
// neox: pairs (i, i + d/2); else adjacent pairs (2i, 2i+1). grid: rows.
extern "C" __global__ void rope_qk(bf16* qkv, const int* pos, int stride, int n_heads,
                                   int n_kv_heads, float ratio, int neox) {
    int t = blockIdx.x;
    bf16* row = qkv + (u64)t * stride;
    const int half = HEAD_DIM / 2;
    int total = (n_heads + n_kv_heads) * half;
    float p = (float)pos[t];
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

// Writes each row's k and v (at k_off and k_off + kv_dim in the row) into the paged pool at
// slot slots[t] (= block * block_size + offset). Pool layout: [slot][kv_head][head_dim].
extern "C" __global__ void kv_write(const bf16* qkv, const int* slots, bf16* kc, bf16* vc,
                                    int stride, int k_off, int kv_dim) {
    int t = blockIdx.x;
    const bf16* row = qkv + (u64)t * stride + k_off;
    u64 dst = (u64)slots[t] * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kc[dst + i] = row[i];
        vc[dst + i] = row[kv_dim + i];
    }
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

// dst[i, :] = src[rows[i], :].
extern "C" __global__ void gather_rows(const bf16* src, const int* rows, bf16* dst, int cols) {
    int i = blockIdx.x;
    const bf16* s = src + (u64)rows[i] * cols;
    bf16* d = dst + (u64)i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}

// Paged attention, one split of the context: block (kv_head, query token, split). Each of
// ATTN_WARPS warps walks keys split_start + warp, + ATTN_WARPS, ...; a lane owns PER_LANE
// consecutive dims of each of the GROUP query heads that share this KV head (so a K/V row is
// read once for the whole group). Online softmax per warp, merged across warps in shared
// memory; the split's unnormalised output and (max, sum) go to part_o / part_ml for
// attn_combine. Causal: token t sees positions 0..=tok_pos[t].
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * WARP)
attn_split(const bf16* q, int q_stride, const bf16* kc, const bf16* vc, const int* block_tables,
           const int* tok_seq, const int* tok_pos, const int* seq_bt_off, int block_size,
           int split_len, int max_splits, int n_kv_heads, float scale, float* part_o,
           float* part_ml) {
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
    for (int p = start + warp; p < end; p += ATTN_WARPS) {
        int blk = table[p / block_size];
        u64 off = ((u64)blk * block_size + (p % block_size)) * kv_dim + kvh * HEAD_DIM + lane * PER_LANE;
        float k[PER_LANE], v[PER_LANE];
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) { k[j] = b2f(kc[off + j]); v[j] = b2f(vc[off + j]); }
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < PER_LANE; j++) s += qr[g][j] * k[j];
            s = warp_sum(s);
            float mn = fmaxf(m[g], s);
            float corr = expf(m[g] - mn);
            float pe = expf(s - mn);
            l[g] = l[g] * corr + pe;
#pragma unroll
            for (int j = 0; j < PER_LANE; j++) acc[g][j] = acc[g][j] * corr + pe * v[j];
            m[g] = mn;
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
