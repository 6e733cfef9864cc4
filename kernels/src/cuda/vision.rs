//! The Idefics3 / SmolVLM vision tower on a GPU ([`CudaVisionTower`]): the CPU tower's
//! weights (`vision::tower`, already reshaped there) uploaded as bf16 matrices (LayerNorms,
//! biases and position embeddings stay f32), and a batch of tiles per pass, so every GEMM is
//! `tiles * patches` rows tall.
//!
//! One pass over `T` tiles of `n` patches (`R = T * n` rows, tile-major: row `t * n + patch`):
//! 1. the tiles' pixels go up (f32); `vis_im2col` lays the patches out as GEMM rows (bf16);
//!    the patch GEMM writes the f32 residual stream `x [R, h]`; `vis_embed_add` adds the
//!    convolution's bias and the position embeddings;
//! 2. per layer: `vis_add_layernorm` (the previous layer's MLP output and bias added to `x`
//!    first), one fused QKV GEMM (f32) and `vis_bias_act` (its bias, to bf16), attention tile
//!    by tile (cuBLAS strided-batched `Q K^T` over the heads, scaled; `vis_softmax_rows`;
//!    `P V` straight into each head's columns), the output GEMM, `vis_add_layernorm` (the
//!    residual add with the output bias), the fc1 GEMM, `vis_bias_act` with GELU, the fc2 GEMM;
//! 3. the post LayerNorm (the last MLP output added first), the pixel shuffle as a row gather
//!    (`gather_rows` with [`pixel_shuffle_rows`]), the connector GEMM (f32), down to the host.
//!
//! Precision: bf16 GEMM operands with f32 accumulation (as the text path), an f32 residual
//! stream, f32 LayerNorm statistics, scores and softmax; the attention probabilities are
//! rounded to bf16 for the `P V` product (as flash attention does).
//!
//! Threads: the tower is shared (`Sync`) by an encoder's blocking tasks. A call takes its
//! lock, makes the device's context current on the calling thread, and returns synchronised.
//! It owns its streams and cuBLAS handle (a [`Gpu`] of its own on the device's primary
//! context), so it runs beside a `CudaBackend` on the same GPU without touching that
//! backend's single-threaded state; the NVRTC build of kernels.cu is the process's cached one
//! whenever the spec matches ([`VISION_KERNEL_SPEC`]).

use super::backend::to_bf16_bits;
use super::device::{Arg, CudaError, DBuf, Gpu, KernelSpec, StridedGemm};
use crate::cpu::linear::Linear;
use crate::vision::tower::{pixel_shuffle_rows, Dense, Norm, VisionConfig, VisionError};
use crate::vision::VisionTower;
use std::sync::Mutex;

/// The kernel module the tower's [`Gpu`] loads. The vision kernels read no compile-time
/// constant, so any valid spec would do; SmolLM2's (head_dim 64, 3 query heads per KV head),
/// the text model of SmolVLM, lets a worker serving SmolVLM on the same GPU compile
/// kernels.cu once (the PTX cache is keyed by arch and spec).
pub const VISION_KERNEL_SPEC: KernelSpec = KernelSpec {
    head_dim: 64,
    group: 3,
};

/// Construction options for [`CudaVisionTower`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaVisionOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Most tiles one pass runs; the scratch is sized for this many (about 36 MB a tile of
    /// SmolVLM's 512-pixel tower), larger batches run in several passes.
    pub max_tiles_per_pass: usize,
}

impl Default for CudaVisionOptions {
    fn default() -> Self {
        CudaVisionOptions {
            device: 0,
            // SmolVLM's largest image: 4 x 4 tiles and the global view, in one or two passes.
            max_tiles_per_pass: 16,
        }
    }
}

/// A dense layer: bf16 `[out, in]` and an f32 bias.
struct DevDense {
    w: DBuf,
    b: DBuf,
}

/// A LayerNorm's f32 weight and bias.
struct DevNorm {
    w: DBuf,
    b: DBuf,
}

struct DevLayer {
    ln1: DevNorm,
    /// q, k and v stacked: `[3h, h]`, bias `[3h]` (output columns q | k | v).
    qkv: DevDense,
    o: DevDense,
    ln2: DevNorm,
    fc1: DevDense,
    fc2: DevDense,
}

struct DevWeights {
    /// `[h, c * p * p]`.
    patch: DevDense,
    /// f32 `[n, h]`.
    pos: DBuf,
    layers: Vec<DevLayer>,
    post_ln: DevNorm,
    /// bf16 `[text_hidden, h * s^2]`.
    proj: DBuf,
}

/// Buffers of one pass, sized for `tiles` tiles (`R = tiles * n` rows).
struct Scratch {
    tiles: usize,
    /// f32 `[tiles, c, image, image]`.
    pixels: DBuf,
    /// bf16 `[R, c * p * p]`.
    patches: DBuf,
    /// f32 `[R, h]`: the residual stream.
    x: DBuf,
    /// bf16 `[R, h]`: LayerNorm outputs (GEMM inputs).
    xn: DBuf,
    /// f32 `[R, wide]` (`wide = max(3h, ffn)`): the QKV, output, fc1 and fc2 GEMMs' results,
    /// each consumed before the next one is written.
    wide_f32: DBuf,
    /// bf16 `[R, wide]`: q | k | v rows (`[R, 3h]`), later the GELU activations (`[R, ffn]`).
    wide_bf16: DBuf,
    /// bf16 `[R, h]`: attention output, heads side by side.
    attn: DBuf,
    /// f32 `[heads, n, n]`: one tile's scaled scores, row `(head, query)`, column key.
    scores: DBuf,
    /// bf16 `[heads, n, n]`: their softmax.
    probs: DBuf,
    /// i32 `[R]`: [`pixel_shuffle_rows`] of `tiles` tiles.
    shuffle_rows: DBuf,
    /// bf16 `[R, h]` = `[tiles * tokens, h * s^2]`: the shuffled features.
    shuffled: DBuf,
    /// f32 `[tiles * tokens, text_hidden]`: the embeddings.
    out: DBuf,
}

// Field order is drop order: the buffers go before the device they live on.
struct Inner {
    w: DevWeights,
    scratch: Option<Scratch>,
    gpu: Gpu,
}

/// The vision tower and connector on one GPU; see the module doc.
pub struct CudaVisionTower {
    cfg: VisionConfig,
    options: CudaVisionOptions,
    inner: Mutex<Inner>,
}

fn device_err(e: CudaError) -> VisionError {
    VisionError::Device(e.to_string())
}

/// Threads per block for a row kernel over `len` values: a multiple of 32, at most 256.
fn row_threads(len: usize) -> u32 {
    len.next_multiple_of(32).clamp(32, 256) as u32
}

/// Blocks for a grid-stride kernel over `total` values, 256 threads each.
fn stride_grid(total: usize) -> u32 {
    total.div_ceil(256).clamp(1, 8192) as u32
}

fn int(v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Shape(format!("{v} exceeds a kernel's i32")))
}

/// Launchers of the `vis_*` kernels (kernels.cu); all asynchronous on the compute stream.
impl Gpu {
    /// `patches[R, c*p*p] = im2col(tiles[T, c, image, image])` (f32 in, bf16 out).
    pub fn vis_im2col(
        &self,
        tiles: u64,
        patches: u64,
        n_tiles: usize,
        channels: usize,
        image: usize,
        patch: usize,
    ) -> Result<(), CudaError> {
        let total = n_tiles * channels * image * image;
        self.launch(
            &self.k.vis_im2col,
            (stride_grid(total), 1, 1),
            256,
            &[
                Arg::P(tiles),
                Arg::P(patches),
                Arg::I(int(n_tiles)?),
                Arg::I(int(channels)?),
                Arg::I(int(image)?),
                Arg::I(int(patch)?),
            ],
        )
    }

    /// `x[r, c] += bias[c] + pos[r % n, c]` (f32).
    pub fn vis_embed_add(
        &self,
        x: u64,
        bias: u64,
        pos: u64,
        rows: usize,
        hidden: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        self.launch(
            &self.k.vis_embed_add,
            (stride_grid(rows * hidden), 1, 1),
            256,
            &[
                Arg::P(x),
                Arg::P(bias),
                Arg::P(pos),
                Arg::I(int(rows)?),
                Arg::I(int(hidden)?),
                Arg::I(int(n.max(1))?),
            ],
        )
    }

    /// If `add != 0`: `x += add + add_bias` (f32 rows; `add_bias` may be 0). Then
    /// `out = LayerNorm(x) * w + b` (bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn vis_add_layernorm(
        &self,
        x: u64,
        add: u64,
        add_bias: u64,
        w: u64,
        b: u64,
        out: u64,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        self.launch(
            &self.k.vis_add_layernorm,
            (int(rows)? as u32, 1, 1),
            row_threads(hidden),
            &[
                Arg::P(x),
                Arg::P(add),
                Arg::P(add_bias),
                Arg::P(w),
                Arg::P(b),
                Arg::P(out),
                Arg::I(int(hidden)?),
                Arg::F(eps),
            ],
        )
    }

    /// `out[r, c] = act(y[r, c] + b[c])` (f32 in, bf16 out), act = GELU (tanh) or none.
    pub fn vis_bias_act(
        &self,
        y: u64,
        b: u64,
        out: u64,
        rows: usize,
        cols: usize,
        gelu: bool,
    ) -> Result<(), CudaError> {
        self.launch(
            &self.k.vis_bias_act,
            (stride_grid(rows * cols), 1, 1),
            256,
            &[
                Arg::P(y),
                Arg::P(b),
                Arg::P(out),
                Arg::I(int(rows)?),
                Arg::I(int(cols.max(1))?),
                Arg::I(i32::from(gelu)),
            ],
        )
    }

    /// `p[r, :] = softmax(s[r, :])` for `rows` f32 rows of `cols` (bf16 out).
    pub fn vis_softmax_rows(
        &self,
        s: u64,
        p: u64,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        self.launch(
            &self.k.vis_softmax_rows,
            (int(rows)? as u32, 1, 1),
            row_threads(cols),
            &[Arg::P(s), Arg::P(p), Arg::I(int(cols)?)],
        )
    }

    /// Bidirectional multi-head attention of one tile: `qkv` holds `n` bf16 rows of
    /// q | k | v (`3 * heads * hd` wide), `out` gets `n` bf16 rows of `heads * hd` (head
    /// `j` in columns `j * hd ..`). `scores` (f32) and `probs` (bf16) hold `heads * n * n`.
    ///
    /// In cuBLAS's column-major terms a row-major `[rows, cols]` matrix of row stride `ld`
    /// is `[cols, rows]` with leading dimension `ld`, so with `ld = 3h` and head `j`'s q, k,
    /// v at column offsets `j * hd`, `h + j * hd`, `2h + j * hd` (batch stride `hd`):
    /// - scores: `C[key, query] = sum_d K[key, d] Q[query, d]`, i.e. `C = A^T B` with
    ///   `A = K` stored `[hd, n]` and `B = Q` stored `[hd, n]`; `C` `[n, n]` with `ldc = n`
    ///   is the row-major `[query, key]` matrix the softmax runs along (batch stride `n^2`);
    /// - output: `C[d, query] = sum_key V[key, d] P[query, key]`, i.e. `C = A B` with
    ///   `A = V` stored `[hd, n]` and `B = P` stored `[n(key), n(query)]` (`ldb = n`); `C`
    ///   `[hd, n]` with `ldc = h` at column offset `j * hd` is head `j`'s slice of `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn vis_attention(
        &self,
        qkv: u64,
        out: u64,
        scores: u64,
        probs: u64,
        n: usize,
        heads: usize,
        hd: usize,
    ) -> Result<(), CudaError> {
        let h = heads * hd;
        let ld = 3 * h;
        let bf = 2u64;
        self.gemm_strided_batched(&StridedGemm {
            trans_a: true,
            m: n,
            n,
            k: hd,
            alpha: 1.0 / (hd as f32).sqrt(),
            a: qkv + h as u64 * bf,
            lda: ld,
            stride_a: hd,
            b: qkv,
            ldb: ld,
            stride_b: hd,
            c: scores,
            ldc: n,
            stride_c: n * n,
            batch: heads,
            c_f32: true,
        })?;
        self.vis_softmax_rows(scores, probs, heads * n, n)?;
        self.gemm_strided_batched(&StridedGemm {
            trans_a: false,
            m: hd,
            n,
            k: n,
            alpha: 1.0,
            a: qkv + 2 * h as u64 * bf,
            lda: ld,
            stride_a: hd,
            b: probs,
            ldb: n,
            stride_b: n * n,
            c: out,
            ldc: h,
            stride_c: hd,
            batch: heads,
            c_f32: false,
        })
    }
}

/// A CPU weight matrix, rows stacked (all of one width), as a bf16 device matrix.
fn upload_rows(gpu: &Gpu, parts: &[&Linear]) -> Result<DBuf, CudaError> {
    let cols = parts.first().map_or(0, |l| l.cols);
    let rows: usize = parts.iter().map(|l| l.rows).sum();
    let mut all = vec![0.0f32; rows * cols];
    let mut at = 0;
    for l in parts {
        if l.cols != cols {
            return Err(CudaError::Shape(
                "stacked matrices of different widths".into(),
            ));
        }
        for r in 0..l.rows {
            l.row_f32(r, &mut all[(at + r) * cols..(at + r + 1) * cols]);
        }
        at += l.rows;
    }
    gpu.upload(&to_bf16_bits(&all))
}

fn upload_dense(gpu: &Gpu, parts: &[&Dense]) -> Result<DevDense, CudaError> {
    let ws: Vec<&Linear> = parts.iter().map(|d| &d.w).collect();
    let bias: Vec<f32> = parts.iter().flat_map(|d| d.b.iter().copied()).collect();
    Ok(DevDense {
        w: upload_rows(gpu, &ws)?,
        b: gpu.upload(&bias)?,
    })
}

fn upload_norm(gpu: &Gpu, n: &Norm) -> Result<DevNorm, CudaError> {
    Ok(DevNorm {
        w: gpu.upload(&n.weight)?,
        b: gpu.upload(&n.bias)?,
    })
}

fn upload_weights(gpu: &Gpu, t: &VisionTower) -> Result<DevWeights, CudaError> {
    let layers = t
        .layers
        .iter()
        .map(|l| {
            Ok(DevLayer {
                ln1: upload_norm(gpu, &l.ln1)?,
                qkv: upload_dense(gpu, &[&l.q, &l.k, &l.v])?,
                o: upload_dense(gpu, &[&l.o])?,
                ln2: upload_norm(gpu, &l.ln2)?,
                fc1: upload_dense(gpu, &[&l.fc1])?,
                fc2: upload_dense(gpu, &[&l.fc2])?,
            })
        })
        .collect::<Result<Vec<_>, CudaError>>()?;
    Ok(DevWeights {
        patch: upload_dense(gpu, &[&t.patch])?,
        pos: gpu.upload(&t.pos)?,
        layers,
        post_ln: upload_norm(gpu, &t.post_ln)?,
        proj: upload_rows(gpu, &[&t.proj])?,
    })
}

impl Scratch {
    fn new(gpu: &Gpu, c: &VisionConfig, tiles: usize) -> Result<Scratch, CudaError> {
        let (h, n) = (c.hidden_size, c.num_patches());
        let rows = tiles * n;
        let wide = (3 * h).max(c.intermediate_size);
        let cpp = c.num_channels * c.patch_size * c.patch_size;
        let shuffle: Vec<i32> = pixel_shuffle_rows(tiles, c.patches_per_side(), c.scale_factor)
            .into_iter()
            .map(int)
            .collect::<Result<_, _>>()?;
        Ok(Scratch {
            tiles,
            pixels: gpu.alloc(tiles * c.tile_len() * 4)?,
            patches: gpu.alloc(rows * cpp * 2)?,
            x: gpu.alloc(rows * h * 4)?,
            xn: gpu.alloc(rows * h * 2)?,
            wide_f32: gpu.alloc(rows * wide * 4)?,
            wide_bf16: gpu.alloc(rows * wide * 2)?,
            attn: gpu.alloc(rows * h * 2)?,
            scores: gpu.alloc(c.n_heads * n * n * 4)?,
            probs: gpu.alloc(c.n_heads * n * n * 2)?,
            shuffle_rows: gpu.upload(&shuffle)?,
            shuffled: gpu.alloc(rows * h * 2)?,
            out: gpu.alloc(tiles * c.tokens_per_tile() * c.text_hidden * 4)?,
        })
    }
}

impl CudaVisionTower {
    /// Uploads `tower`'s weights to GPU `options.device` (the CPU tower is left as it was).
    pub fn new(
        tower: &VisionTower,
        options: CudaVisionOptions,
    ) -> Result<CudaVisionTower, VisionError> {
        if options.max_tiles_per_pass == 0 {
            return Err(VisionError::Config(
                "max_tiles_per_pass must be at least 1".into(),
            ));
        }
        let cfg = tower.config().clone();
        let gpu = Gpu::new(options.device, VISION_KERNEL_SPEC).map_err(device_err)?;
        let w = upload_weights(&gpu, tower).map_err(device_err)?;
        gpu.sync().map_err(device_err)?;
        Ok(CudaVisionTower {
            cfg,
            options,
            inner: Mutex::new(Inner {
                w,
                scratch: None,
                gpu,
            }),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    pub fn options(&self) -> CudaVisionOptions {
        self.options
    }

    /// The device's name (e.g. "NVIDIA H200").
    pub fn device_name(&self) -> String {
        self.lock().gpu.name.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic mid-pass leaves nothing half-updated that a later pass reads first.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tiles (each `[channels, image_size, image_size]`, normalised) to their embeddings,
    /// `[tiles * tokens_per_tile, text_hidden]` row-major, in order: what
    /// [`VisionTower::encode_tile`] gives tile by tile, in bf16 arithmetic.
    pub fn encode_tiles(&self, tiles: &[Vec<f32>]) -> Result<Vec<f32>, VisionError> {
        let c = &self.cfg;
        if let Some(bad) = tiles.iter().find(|t| t.len() != c.tile_len()) {
            return Err(VisionError::BadTile {
                got: bad.len(),
                expected: c.tile_len(),
                side: c.image_size,
            });
        }
        let mut out = Vec::with_capacity(tiles.len() * c.tokens_per_tile() * c.text_hidden);
        if tiles.is_empty() {
            return Ok(out);
        }
        let mut inner = self.lock();
        inner
            .gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| VisionError::Device(format!("making the CUDA context current: {e:?}")))?;
        let per_pass = self.options.max_tiles_per_pass;
        for chunk in tiles.chunks(per_pass) {
            out.extend(inner.pass(c, chunk).map_err(device_err)?);
        }
        Ok(out)
    }
}

impl Inner {
    /// Scratch for at least `tiles` tiles.
    fn ensure_scratch(&mut self, c: &VisionConfig, tiles: usize) -> Result<(), CudaError> {
        if self.scratch.as_ref().is_some_and(|s| s.tiles >= tiles) {
            return Ok(());
        }
        // Free the old buffers before allocating the larger ones.
        self.scratch = None;
        self.scratch = Some(Scratch::new(&self.gpu, c, tiles)?);
        Ok(())
    }

    /// One pass over `tiles` (each of `c.tile_len()` values, checked by the caller).
    fn pass(&mut self, c: &VisionConfig, tiles: &[Vec<f32>]) -> Result<Vec<f32>, CudaError> {
        let t = tiles.len();
        self.ensure_scratch(c, t)?;
        let (g, w) = (&self.gpu, &self.w);
        let Some(sc) = self.scratch.as_ref() else {
            return Err(CudaError::Shape("vision scratch missing".into()));
        };
        let (h, n, heads, ffn) = (
            c.hidden_size,
            c.num_patches(),
            c.n_heads,
            c.intermediate_size,
        );
        let hd = h / heads;
        let rows = t * n;
        let cpp = c.num_channels * c.patch_size * c.patch_size;
        let s2 = c.scale_factor * c.scale_factor;
        let tokens = t * c.tokens_per_tile();
        let eps = c.layer_norm_eps;
        let bf = 2u64;

        // 1. Embeddings: pixels up, im2col, the patch GEMM into x, bias + positions.
        let tile_bytes = c.tile_len() * 4;
        for (i, tile) in tiles.iter().enumerate() {
            g.htod(tile, &sc.pixels, i * tile_bytes)?;
        }
        g.vis_im2col(
            sc.pixels.ptr(),
            sc.patches.ptr(),
            t,
            c.num_channels,
            c.image_size,
            c.patch_size,
        )?;
        g.gemm_xwt(
            sc.patches.ptr(),
            cpp,
            w.patch.w.ptr(),
            sc.x.ptr(),
            h,
            rows,
            h,
            cpp,
            true,
        )?;
        g.vis_embed_add(sc.x.ptr(), w.patch.b.ptr(), w.pos.ptr(), rows, h, n)?;

        // 2. The layers. `pending`: the bias of the MLP output in `wide_f32` that the next
        // LayerNorm adds to x first (none before the first layer).
        let mut pending: Option<u64> = None;
        let add_of = |p: Option<u64>| p.map_or((0, 0), |b| (sc.wide_f32.ptr(), b));
        for l in &w.layers {
            let (add, add_b) = add_of(pending);
            g.vis_add_layernorm(
                sc.x.ptr(),
                add,
                add_b,
                l.ln1.w.ptr(),
                l.ln1.b.ptr(),
                sc.xn.ptr(),
                rows,
                h,
                eps,
            )?;
            g.gemm_xwt(
                sc.xn.ptr(),
                h,
                l.qkv.w.ptr(),
                sc.wide_f32.ptr(),
                3 * h,
                rows,
                3 * h,
                h,
                true,
            )?;
            g.vis_bias_act(
                sc.wide_f32.ptr(),
                l.qkv.b.ptr(),
                sc.wide_bf16.ptr(),
                rows,
                3 * h,
                false,
            )?;
            // Tile `i`'s rows start at row i * n of qkv (stride 3h) and of attn (stride h).
            for i in 0..t {
                g.vis_attention(
                    sc.wide_bf16.ptr() + (i * n * 3 * h) as u64 * bf,
                    sc.attn.ptr() + (i * n * h) as u64 * bf,
                    sc.scores.ptr(),
                    sc.probs.ptr(),
                    n,
                    heads,
                    hd,
                )?;
            }
            g.gemm_xwt(
                sc.attn.ptr(),
                h,
                l.o.w.ptr(),
                sc.wide_f32.ptr(),
                h,
                rows,
                h,
                h,
                true,
            )?;
            g.vis_add_layernorm(
                sc.x.ptr(),
                sc.wide_f32.ptr(),
                l.o.b.ptr(),
                l.ln2.w.ptr(),
                l.ln2.b.ptr(),
                sc.xn.ptr(),
                rows,
                h,
                eps,
            )?;
            g.gemm_xwt(
                sc.xn.ptr(),
                h,
                l.fc1.w.ptr(),
                sc.wide_f32.ptr(),
                ffn,
                rows,
                ffn,
                h,
                true,
            )?;
            g.vis_bias_act(
                sc.wide_f32.ptr(),
                l.fc1.b.ptr(),
                sc.wide_bf16.ptr(),
                rows,
                ffn,
                true,
            )?;
            g.gemm_xwt(
                sc.wide_bf16.ptr(),
                ffn,
                l.fc2.w.ptr(),
                sc.wide_f32.ptr(),
                h,
                rows,
                h,
                ffn,
                true,
            )?;
            pending = Some(l.fc2.b.ptr());
        }

        // 3. Post LayerNorm, pixel shuffle, connector.
        let (add, add_b) = add_of(pending);
        g.vis_add_layernorm(
            sc.x.ptr(),
            add,
            add_b,
            w.post_ln.w.ptr(),
            w.post_ln.b.ptr(),
            sc.xn.ptr(),
            rows,
            h,
            eps,
        )?;
        // `rows` rows of h gathered: the first t * n entries of the scratch's index, which
        // depend only on the tile (see `pixel_shuffle_rows`).
        g.gather_rows(
            sc.xn.ptr(),
            sc.shuffle_rows.ptr(),
            sc.shuffled.ptr(),
            rows,
            h,
        )?;
        g.gemm_xwt(
            sc.shuffled.ptr(),
            h * s2,
            w.proj.ptr(),
            sc.out.ptr(),
            c.text_hidden,
            tokens,
            c.text_hidden,
            h * s2,
            true,
        )?;
        let mut out = vec![0.0f32; tokens * c.text_hidden];
        g.dtoh(&sc.out, 0, &mut out)?;
        Ok(out)
    }
}

impl Drop for CudaVisionTower {
    fn drop(&mut self) {
        // The buffers free themselves on the device's context; a tower dropped on another
        // thread than the one that last used it makes that context current first.
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = inner.gpu.ctx.bind_to_thread();
    }
}
