//! The device: a CUDA context with a compute stream and a copy stream, the NVRTC-compiled
//! kernel module (compiled once per process per (arch, head_dim, group) and cached), and a
//! cuBLAS handle for bf16 GEMMs with f32 accumulation.
//!
//! Buffers are untyped byte allocations ([`DBuf`]); kernels take raw device addresses. Event
//! tracking is off: all work of one backend is ordered on its compute stream, and the copy
//! stream is joined explicitly where it is used.

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self as drv, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DevicePtr, LaunchConfig, PushKernelArg,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use thiserror::Error;

/// The kernels' CUDA C source.
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Why a device operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CudaError {
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("NVRTC compile failed: {0}")]
    Compile(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("unsupported shape: {0}")]
    Shape(String),
}

impl From<drv::DriverError> for CudaError {
    fn from(e: drv::DriverError) -> Self {
        CudaError::Driver(format!("{e:?}"))
    }
}

impl From<cublas::result::CublasError> for CudaError {
    fn from(e: cublas::result::CublasError) -> Self {
        CudaError::Blas(format!("{e:?}"))
    }
}

/// Compile-time constants a kernel module is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelSpec {
    pub head_dim: usize,
    /// Query heads per KV head.
    pub group: usize,
}

/// PTX per (arch, spec), shared by every context of the process.
fn ptx_cache() -> &'static Mutex<BTreeMap<(String, KernelSpec), String>> {
    static CACHE: OnceLock<Mutex<BTreeMap<(String, KernelSpec), String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// NVRTC's `--gpu-architecture` value for a compute capability (`&'static` as cudarc wants).
fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, _) => "sm_90",
        (8, 9) => "sm_89",
        (8, 6) => "sm_86",
        (8, _) => "sm_80",
        (10, _) => "sm_100",
        (12, _) => "sm_120",
        _ => "sm_80",
    }
}

/// `TURBINE_ATTN_UNROLL=N` (1..=8) sets how many keys each decode-attention warp loads ahead
/// (kernels.cu's default, 1, otherwise): a benchmarking knob. Read once per process, so the PTX cache stays keyed by (arch, spec).
fn attn_unroll_define() -> String {
    std::env::var("TURBINE_ATTN_UNROLL")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=8).contains(n))
        .map(|n| format!("#define ATTN_UNROLL {n}\n"))
        .unwrap_or_default()
}

fn compile(arch: &'static str, spec: KernelSpec) -> Result<String, CudaError> {
    let key = (arch.to_string(), spec);
    let mut cache = ptx_cache()
        .lock()
        .map_err(|_| CudaError::Compile("PTX cache poisoned".into()))?;
    if let Some(p) = cache.get(&key) {
        return Ok(p.clone());
    }
    let src = format!(
        "#define HEAD_DIM {}\n#define GROUP {}\n{}{}",
        spec.head_dim,
        spec.group,
        attn_unroll_define(),
        KERNEL_SOURCE
    );
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
    let text = ptx.to_src();
    cache.insert(key, text.clone());
    Ok(text)
}

/// A device allocation of `len` bytes. Freed on drop.
pub struct DBuf {
    _mem: Mem,
    ptr: u64,
    len: usize,
}

/// What holds a [`DBuf`]'s memory (only kept, never read: dropping it frees the memory).
enum Mem {
    /// Its own allocation from the stream-ordered pool.
    Pooled(#[allow(dead_code)] CudaSlice<u8>),
    /// A part of a [`SharedAlloc`] (freed when the last part goes).
    Part(#[allow(dead_code)] Arc<SharedAlloc>),
}

impl DBuf {
    /// Raw device address (what kernels take).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One device allocation made with `cuMemAlloc` rather than from the stream-ordered pool:
/// the kind another process can map by a CUDA IPC handle ([`SharedAlloc::ipc_handle`]).
/// The KV pool is one of these, cut into per-layer [`DBuf`]s ([`SharedAlloc::part`]).
pub struct SharedAlloc {
    ptr: u64,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl SharedAlloc {
    /// Allocates `len` bytes (uninitialised).
    pub fn new(gpu: &Gpu, len: usize) -> Result<Arc<SharedAlloc>, CudaError> {
        gpu.ctx.bind_to_thread()?;
        let len = len.max(1);
        // SAFETY: a plain allocation of `len` bytes in the current context.
        let ptr = unsafe { drv::result::malloc_sync(len)? };
        Ok(Arc::new(SharedAlloc {
            ptr,
            len,
            ctx: gpu.ctx.clone(),
        }))
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `offset..offset + len` as a buffer that keeps the allocation alive.
    pub fn part(self: &Arc<Self>, offset: usize, len: usize) -> Result<DBuf, CudaError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(CudaError::Shape(format!(
                "a part {offset}+{len} of an allocation of {} bytes",
                self.len
            )));
        }
        Ok(DBuf {
            _mem: Mem::Part(self.clone()),
            ptr: self.ptr + offset as u64,
            len,
        })
    }

    /// The allocation's IPC handle: another process on this host opens it with
    /// [`IpcMapping::open`] (the same process cannot).
    pub fn ipc_handle(&self) -> Result<[u8; 64], CudaError> {
        self.ctx.bind_to_thread()?;
        let mut h = std::mem::MaybeUninit::<drv::sys::CUipcMemHandle>::zeroed();
        // SAFETY: `h` is the handle struct the call fills; `ptr` is this allocation's base.
        let h = unsafe {
            drv::sys::cuIpcGetMemHandle(h.as_mut_ptr(), self.ptr).result()?;
            h.assume_init()
        };
        Ok(h.reserved.map(|c| c as u8))
    }
}

impl Drop for SharedAlloc {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemAlloc in `new`; every part (and every queued use, since
        // each backend call ends synchronised) is gone.
        unsafe {
            let _ = drv::result::free_sync(self.ptr);
        }
    }
}

/// Another process's allocation mapped into this context by its IPC handle; unmapped on
/// drop.
pub struct IpcMapping {
    ptr: u64,
    ctx: Arc<CudaContext>,
}

impl IpcMapping {
    /// Maps the allocation of `handle` (from [`SharedAlloc::ipc_handle`] in another
    /// process; peer access to its device is enabled as needed).
    pub fn open(gpu: &Gpu, handle: &[u8]) -> Result<IpcMapping, CudaError> {
        let Ok(bytes) = <[u8; 64]>::try_from(handle) else {
            return Err(CudaError::Shape(format!(
                "an IPC handle of {} bytes",
                handle.len()
            )));
        };
        gpu.ctx.bind_to_thread()?;
        let h = drv::sys::CUipcMemHandle {
            reserved: bytes.map(|b| b as _),
        };
        let mut ptr = 0u64;
        // SAFETY: `ptr` receives the mapping's address; a bad handle is an error, not UB.
        unsafe {
            drv::sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                drv::sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
            .result()?;
        }
        Ok(IpcMapping {
            ptr,
            ctx: gpu.ctx.clone(),
        })
    }

    /// The mapped allocation's base address in this context.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: opened by cuIpcOpenMemHandle in `open`; the owner of the mapping
        // synchronises its copies before dropping it.
        unsafe {
            let _ = drv::sys::cuIpcCloseMemHandle(self.ptr);
        }
    }
}

// SAFETY: plain device addresses plus a thread-safe context handle.
unsafe impl Send for SharedAlloc {}
unsafe impl Sync for SharedAlloc {}
unsafe impl Send for IpcMapping {}

/// The kernels, by name.
pub struct Kernels {
    _module: Arc<CudaModule>,
    pub init_uniform_bf16: CudaFunction,
    pub init_uniform_f32: CudaFunction,
    pub embed_rows: CudaFunction,
    pub add_rmsnorm: CudaFunction,
    pub add_bias: CudaFunction,
    pub rope_qk: CudaFunction,
    pub kv_write: CudaFunction,
    pub rope_kv_write: CudaFunction,
    pub swiglu: CudaFunction,
    pub gather_rows: CudaFunction,
    pub attn_split: CudaFunction,
    pub attn_combine: CudaFunction,
    pub attn_prefill: CudaFunction,
    pub attn_prefill_wide: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub sample_rows: CudaFunction,
    pub copy_segments: CudaFunction,
    pub gemv_xwt: CudaFunction,
    pub vis_im2col: CudaFunction,
    pub vis_embed_add: CudaFunction,
    pub vis_add_layernorm: CudaFunction,
    pub vis_bias_act: CudaFunction,
    pub vis_softmax_rows: CudaFunction,
}

/// One GPU: context, streams, kernels, cuBLAS.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// All kernels and GEMMs run here, in order.
    pub compute: Arc<CudaStream>,
    /// Host<->device block transfers (export/import) run here.
    pub copy: Arc<CudaStream>,
    pub k: Kernels,
    pub spec: KernelSpec,
    blas: CudaBlas,
    /// cuBLAS's workspace, set explicitly so that no GEMM allocates while a CUDA graph is
    /// being captured.
    _blas_workspace: DBuf,
    pub arch: &'static str,
    pub name: String,
    /// GEMMs of at most [`GEMV_MAX_ROWS`] rows run the `gemv_xwt` kernel instead of cuBLAS
    /// (off unless `TURBINE_CUDA_GEMV=1`: it measured slower than cuBLAS on the H200 except
    /// for one row over small matrices; kept to compare and to build on).
    pub gemv: bool,
}

/// Most rows a GEMM may have to take the `gemv_xwt` kernel (its `GEMV_ROWS`).
pub const GEMV_MAX_ROWS: usize = 8;

/// Whether small GEMMs use `gemv_xwt`: only with `TURBINE_CUDA_GEMV=1` (every GEMM goes to
/// cuBLAS otherwise).
fn gemv_from_env() -> bool {
    std::env::var_os("TURBINE_CUDA_GEMV").is_some_and(|v| v == "1")
}

// The context and streams are used from one thread at a time (the executor's own thread);
// cudarc's handles are thread-safe to move.
unsafe impl Send for Gpu {}

/// The shared libraries the backend loads at run time, probed without panicking (cudarc
/// panics on first use of a missing library).
fn check_libraries() -> Result<(), CudaError> {
    // SAFETY: each probe only opens (and closes) the library by name.
    let present = unsafe {
        [
            (
                "the CUDA driver library (libcuda)",
                drv::sys::is_culib_present(),
            ),
            (
                "NVRTC (libnvrtc.so.13)",
                cudarc::nvrtc::sys::is_culib_present(),
            ),
            ("cuBLAS (libcublas.so.13)", cublas::sys::is_culib_present()),
        ]
    };
    match present.iter().find(|(_, ok)| !ok) {
        Some((name, _)) => Err(CudaError::NoDevice(format!("{name} could not be loaded"))),
        None => Ok(()),
    }
}

/// How many CUDA devices there are; an error with the reason when the driver, NVRTC or
/// cuBLAS cannot be loaded (the backend needs all three).
pub fn device_count() -> Result<usize, CudaError> {
    check_libraries()?;
    let r = std::panic::catch_unwind(CudaContext::device_count);
    match r {
        Ok(Ok(n)) => Ok(n.max(0) as usize),
        Ok(Err(e)) => Err(CudaError::NoDevice(format!("{e:?}"))),
        Err(_) => Err(CudaError::NoDevice(
            "the CUDA driver library (libcuda) could not be loaded".into(),
        )),
    }
}

fn grid_for(n: usize, threads: u32) -> u32 {
    (n.div_ceil(threads as usize)).clamp(1, 65535 * 8) as u32
}

/// A kernel argument: a device address, or a scalar.
pub enum Arg {
    P(u64),
    I(i32),
    F(f32),
    U(u64),
}

impl Gpu {
    /// Opens device `ordinal` and compiles (or takes from the process cache) the kernels for
    /// `spec`.
    pub fn new(ordinal: usize, spec: KernelSpec) -> Result<Gpu, CudaError> {
        if spec.head_dim % 32 != 0 || spec.head_dim > 256 || spec.group == 0 || spec.group > 16 {
            return Err(CudaError::Shape(format!(
                "head_dim must be a multiple of 32 up to 256 and group 1..=16, got {spec:?}"
            )));
        }
        let n = device_count()?;
        if ordinal >= n {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} asked for, {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: no buffer is shared between streams without an explicit join.
        unsafe { ctx.disable_event_tracking() };
        let (maj, min) = ctx.compute_capability()?;
        let arch = arch_name(maj, min);
        let name = ctx.name()?;
        let compute = ctx.new_stream()?;
        let copy = ctx.new_stream()?;
        let ptx = compile(arch, spec)?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
        let f = |n: &str| module.load_function(n);
        let k = Kernels {
            init_uniform_bf16: f("init_uniform_bf16")?,
            init_uniform_f32: f("init_uniform_f32")?,
            embed_rows: f("embed_rows")?,
            add_rmsnorm: f("add_rmsnorm")?,
            add_bias: f("add_bias")?,
            rope_qk: f("rope_qk")?,
            kv_write: f("kv_write")?,
            rope_kv_write: f("rope_kv_write")?,
            swiglu: f("swiglu")?,
            gather_rows: f("gather_rows")?,
            attn_split: f("attn_split")?,
            attn_combine: f("attn_combine")?,
            attn_prefill: f("attn_prefill")?,
            attn_prefill_wide: f("attn_prefill_wide")?,
            argmax_rows: f("argmax_rows")?,
            sample_rows: f("sample_rows")?,
            copy_segments: f("copy_segments")?,
            gemv_xwt: f("gemv_xwt")?,
            vis_im2col: f("vis_im2col")?,
            vis_embed_add: f("vis_embed_add")?,
            vis_add_layernorm: f("vis_add_layernorm")?,
            vis_bias_act: f("vis_bias_act")?,
            vis_softmax_rows: f("vis_softmax_rows")?,
            _module: module,
        };
        let blas = CudaBlas::new(compute.clone())?;
        let ws_bytes = BLAS_WORKSPACE_BYTES;
        // SAFETY: cuBLAS only uses it as scratch; it lives as long as the handle.
        let ws = unsafe { compute.alloc::<u8>(ws_bytes)? };
        let ws_ptr = ws.device_ptr(&compute).0;
        // SAFETY: a live allocation of `ws_bytes` on the handle's stream's device.
        unsafe {
            cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ws_ptr as *mut _, ws_bytes)
                .result()?;
        }
        let blas_workspace = DBuf {
            len: ws.len(),
            _mem: Mem::Pooled(ws),
            ptr: ws_ptr,
        };
        Ok(Gpu {
            ctx,
            compute,
            copy,
            k,
            spec,
            blas,
            _blas_workspace: blas_workspace,
            arch,
            name,
            gemv: gemv_from_env(),
        })
    }

    /// Allocates `bytes` (uninitialised).
    pub fn alloc(&self, bytes: usize) -> Result<DBuf, CudaError> {
        // SAFETY: callers write before they read (tests poison explicitly).
        let slice = unsafe { self.compute.alloc::<u8>(bytes.max(1))? };
        let ptr = slice.device_ptr(&self.compute).0;
        Ok(DBuf {
            len: slice.len(),
            _mem: Mem::Pooled(slice),
            ptr,
        })
    }

    /// Allocates and uploads.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DBuf, CudaError> {
        let b = self.alloc(std::mem::size_of_val(data))?;
        self.htod(data, &b, 0)?;
        Ok(b)
    }

    /// Host -> device at byte `offset` of `dst`, on the compute stream (synchronous for the
    /// host buffer: the call returns once the data is read).
    pub fn htod<T: Copy>(&self, src: &[T], dst: &DBuf, offset: usize) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(src);
        if offset + bytes > dst.len() {
            return Err(CudaError::Shape("upload past the end of a buffer".into()));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked; synchronised before `src` can go away.
        unsafe {
            let raw = std::slice::from_raw_parts(src.as_ptr() as *const u8, bytes);
            drv::result::memcpy_htod_async(dst.ptr + offset as u64, raw, self.compute.cu_stream())?;
        }
        self.compute.synchronize()?;
        Ok(())
    }

    /// Device -> host of `dst.len()` elements from byte `offset` of `src` (synchronises).
    pub fn dtoh<T: Copy>(&self, src: &DBuf, offset: usize, dst: &mut [T]) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(dst);
        if offset + bytes > src.len() {
            return Err(CudaError::Shape("download past the end of a buffer".into()));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked; synchronised before returning.
        unsafe {
            let raw = std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, bytes);
            drv::result::memcpy_dtoh_async(raw, src.ptr + offset as u64, self.compute.cu_stream())?;
        }
        self.compute.synchronize()?;
        Ok(())
    }

    /// Device -> device copy of `bytes` on the compute stream (asynchronous).
    pub fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the caller passes addresses inside live allocations.
        unsafe { drv::result::memcpy_dtod_async(dst, src, bytes, self.compute.cu_stream())? };
        Ok(())
    }

    /// Fills `bytes` bytes at `ptr` with `byte` (0xFF in bf16/f32 is a NaN: the poison).
    pub fn fill(&self, ptr: u64, byte: u8, bytes: usize) -> Result<(), CudaError> {
        // SAFETY: the caller passes a live allocation.
        unsafe { drv::result::memset_d8_async(ptr, byte, bytes, self.compute.cu_stream())? };
        Ok(())
    }

    pub fn sync(&self) -> Result<(), CudaError> {
        self.compute.synchronize()?;
        Ok(())
    }

    /// Launches `f` on the compute stream.
    pub fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        self.launch_on(&self.compute, f, grid, block, args)
    }

    /// Launches `f` on `stream` (the compute or the copy stream).
    pub fn launch_on(
        &self,
        stream: &Arc<CudaStream>,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        let mut lb = stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) | Arg::U(p) => lb.arg(p),
                Arg::I(i) => lb.arg(i),
                Arg::F(x) => lb.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument lists match the kernels' signatures in kernels.cu (checked by the
        // kernel tests).
        unsafe { lb.launch(cfg)? };
        Ok(())
    }

    /// Fills `n` bf16 values at `ptr` with seeded uniform values in offset ± scale.
    pub fn init_uniform_bf16(
        &self,
        ptr: u64,
        n: usize,
        seed: u64,
        scale: f32,
        offset: f32,
    ) -> Result<(), CudaError> {
        let grid = grid_for(n, 256).min(132 * 16);
        self.launch(
            &self.k.init_uniform_bf16,
            (grid, 1, 1),
            256,
            &[
                Arg::P(ptr),
                Arg::U(n as u64),
                Arg::U(seed),
                Arg::F(scale),
                Arg::F(offset),
            ],
        )
    }

    /// Same for f32 values.
    pub fn init_uniform_f32(
        &self,
        ptr: u64,
        n: usize,
        seed: u64,
        scale: f32,
        offset: f32,
    ) -> Result<(), CudaError> {
        let grid = grid_for(n, 256).min(132 * 16);
        self.launch(
            &self.k.init_uniform_f32,
            (grid, 1, 1),
            256,
            &[
                Arg::P(ptr),
                Arg::U(n as u64),
                Arg::U(seed),
                Arg::F(scale),
                Arg::F(offset),
            ],
        )
    }

    /// `y[n, out] = x[n, in] · w[out, in]^T` (row-major, bf16 in, f32 accumulate); `y` is
    /// bf16 or, with `y_f32`, f32. `ldx`/`ldy` are the row strides in elements.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_xwt(
        &self,
        x: u64,
        ldx: usize,
        w: u64,
        y: u64,
        ldy: usize,
        n: usize,
        out: usize,
        inp: usize,
        y_f32: bool,
    ) -> Result<(), CudaError> {
        if self.gemv_fits(x, ldx, w, n, inp) {
            return self.gemv_xwt(x, ldx, w, y, ldy, n, out, inp, y_f32, false);
        }
        use cublas::sys;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ty = if y_f32 {
            sys::cudaDataType::CUDA_R_32F
        } else {
            sys::cudaDataType::CUDA_R_16BF
        };
        // Column-major view: C^T[out, n] = W^T... i.e. op(A) = A^T with A = W as [in, out].
        // SAFETY: the caller passes buffers of at least these shapes.
        unsafe {
            cublas::result::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                out as i32,
                n as i32,
                inp as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                inp as i32,
                x as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                ldx as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                ty,
                ldy as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    /// cuBLAS's strided batched GEMM in its own column-major terms, bf16 operands, f32
    /// accumulation: for each `i < g.batch`, `C_i = alpha * op(A_i) * B_i` with
    /// `A_i = a + i * stride_a` etc. (strides and leading dimensions in elements), `op(A)` =
    /// `A^T` when `trans_a` (A stored `[k, m]`) else `A` (stored `[m, k]`), B `[k, n]`, C
    /// `[m, n]`, bf16 or (with `c_f32`) f32. A row-major `[rows, cols]` matrix with row stride
    /// `ld` is a column-major `[cols, rows]` one with leading dimension `ld`: see
    /// `cuda::vision` for the attention products written this way.
    pub fn gemm_strided_batched(&self, g: &StridedGemm) -> Result<(), CudaError> {
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        use cublas::sys;
        let beta = 0.0f32;
        let c_ty = if g.c_f32 {
            sys::cudaDataType::CUDA_R_32F
        } else {
            sys::cudaDataType::CUDA_R_16BF
        };
        let op_a = if g.trans_a {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        };
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| CudaError::Shape(format!("GEMM {what} {v} exceeds i32")))
        };
        // SAFETY: the caller passes buffers holding every batch entry at these strides.
        unsafe {
            cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op_a,
                sys::cublasOperation_t::CUBLAS_OP_N,
                int(g.m, "m")?,
                int(g.n, "n")?,
                int(g.k, "k")?,
                &g.alpha as *const f32 as *const _,
                g.a as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                int(g.lda, "lda")?,
                g.stride_a as i64,
                g.b as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                int(g.ldb, "ldb")?,
                g.stride_b as i64,
                &beta as *const f32 as *const _,
                g.c as *mut _,
                c_ty,
                int(g.ldc, "ldc")?,
                g.stride_c as i64,
                int(g.batch, "batch")?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    /// Whether a GEMM of these operands can take `gemv_xwt`: few rows, 16-byte aligned rows
    /// of x and w.
    fn gemv_fits(&self, x: u64, ldx: usize, w: u64, n: usize, inp: usize) -> bool {
        self.gemv
            && (1..=GEMV_MAX_ROWS).contains(&n)
            && inp % 8 == 0
            && ldx % 8 == 0
            && x % 16 == 0
            && w % 16 == 0
            && inp <= i32::MAX as usize
    }

    /// The `gemv_xwt` kernel (see kernels.cu); `swiglu`: x holds gate|up rows of `2 * inp`
    /// and the input is their SwiGLU.
    #[allow(clippy::too_many_arguments)]
    fn gemv_xwt(
        &self,
        x: u64,
        ldx: usize,
        w: u64,
        y: u64,
        ldy: usize,
        n: usize,
        out: usize,
        inp: usize,
        y_f32: bool,
        swiglu: bool,
    ) -> Result<(), CudaError> {
        let (yf, yb) = if y_f32 { (y, 0) } else { (0, y) };
        self.launch(
            &self.k.gemv_xwt,
            (out.div_ceil(8) as u32, 1, 1),
            256,
            &[
                Arg::P(x),
                Arg::I(ldx as i32),
                Arg::P(w),
                Arg::P(yf),
                Arg::P(yb),
                Arg::I(ldy as i32),
                Arg::I(n as i32),
                Arg::I(out as i32),
                Arg::I(inp as i32),
                Arg::I(i32::from(swiglu)),
            ],
        )
    }

    /// The down projection of a SwiGLU MLP: `y[n, out] = swiglu(gu)[n, ffn] · w[out, ffn]^T`
    /// with `gu` rows of `2 * ffn` (gate then up), bf16 out. Small batches read `gu` directly
    /// in `gemv_xwt` (one launch); others write the activation to `act` (`n * ffn` bf16) and
    /// run a GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_down(
        &self,
        gu: u64,
        act: u64,
        w: u64,
        y: u64,
        ldy: usize,
        n: usize,
        out: usize,
        ffn: usize,
    ) -> Result<(), CudaError> {
        if self.gemv_fits(gu, 2 * ffn, w, n, ffn) {
            return self.gemv_xwt(gu, 2 * ffn, w, y, ldy, n, out, ffn, false, true);
        }
        self.swiglu(gu, act, n, ffn)?;
        self.gemm_xwt(act, ffn, w, y, ldy, n, out, ffn, false)
    }

    /// A timing event on the compute stream.
    pub fn event(&self) -> Result<CudaEvent, CudaError> {
        let e = self
            .ctx
            .new_event(Some(drv::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(&self.compute)?;
        Ok(e)
    }

    /// This device's UUID.
    pub fn device_uuid(&self) -> Result<[u8; 16], CudaError> {
        Ok(self.ctx.uuid()?.bytes.map(|c| c as u8))
    }

    /// Whether this device can map memory of the device with UUID `peer`: `Some(true)` for
    /// itself or a peer it has access to, `None` when no visible device has that UUID.
    pub fn peer_access(&self, peer: &[u8; 16]) -> Result<Option<bool>, CudaError> {
        for ordinal in 0..device_count()? {
            let dev = drv::result::device::get(ordinal as i32)?;
            let uuid = drv::result::device::get_uuid(dev)?.bytes.map(|c| c as u8);
            if &uuid != peer {
                continue;
            }
            if dev == self.ctx.cu_device() {
                return Ok(Some(true));
            }
            let mut can = 0i32;
            // SAFETY: two valid device handles; the call only writes `can`.
            unsafe {
                drv::sys::cuDeviceCanAccessPeer(&mut can, self.ctx.cu_device(), dev).result()?;
            }
            return Ok(Some(can != 0));
        }
        Ok(None)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.ctx.mem_get_info()?)
    }
}

/// One [`Gpu::gemm_strided_batched`] call, in cuBLAS's column-major terms (elements, not
/// bytes, for every leading dimension and stride; addresses are device addresses).
#[derive(Clone, Copy, Debug)]
pub struct StridedGemm {
    pub trans_a: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub c_f32: bool,
}

/// cuBLAS workspace (32 MiB: what cuBLAS asks for on Hopper for its largest kernels).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Page-locked host memory of `len` bytes: what asynchronous copies between host and device
/// need to run at full speed and truly asynchronously (no staging copy by the driver). KV
/// blocks leave and enter a pool through it ([`crate::cuda::backend`]'s `kv_copy`).
pub struct PinnedBytes {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain host memory owned by this value; used by one thread at a time.
unsafe impl Send for PinnedBytes {}

impl PinnedBytes {
    /// Allocates `len` bytes (zeroed). The context must be current (it is on the thread that
    /// made the [`Gpu`]).
    pub fn new(gpu: &Gpu, len: usize) -> Result<PinnedBytes, CudaError> {
        gpu.ctx.bind_to_thread()?;
        let len = len.max(1);
        // SAFETY: a fresh allocation of `len` bytes, zeroed before use.
        let ptr = unsafe { drv::result::malloc_host(len, 0)? } as *mut u8;
        if ptr.is_null() {
            return Err(CudaError::Driver("cuMemHostAlloc returned null".into()));
        }
        // SAFETY: `ptr` holds `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(PinnedBytes { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address (for copies queued on a stream).
    pub fn host_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes. Only read or write them while no copy into or out of them is in flight.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc in `new`; no copy is in flight (see as_slice).
        unsafe {
            let _ = drv::result::free_host(self.ptr as *mut _);
        }
    }
}

/// Page-locked host memory of `len` i32 words, for asynchronous copies (the step's metadata
/// up, its sampled tokens down) that need no staging copy by the driver.
pub struct PinnedWords {
    bytes: PinnedBytes,
    len: usize,
}

impl PinnedWords {
    /// Allocates `len` words (zeroed). The context must be current (it is on the thread that
    /// made the [`Gpu`]).
    pub fn new(gpu: &Gpu, len: usize) -> Result<PinnedWords, CudaError> {
        let len = len.max(1);
        Ok(PinnedWords {
            bytes: PinnedBytes::new(gpu, len * 4)?,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr(&self) -> *mut i32 {
        self.bytes.ptr as *mut i32
    }

    /// The words. Only read or write them while no copy into or out of them is in flight
    /// (every backend call ends synchronised).
    pub fn as_slice(&self) -> &[i32] {
        // SAFETY: cuMemHostAlloc memory is page-aligned and holds `len` i32.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [i32] {
        // SAFETY: as above, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }
}

/// A captured CUDA graph of work on the compute stream, replayed with [`Gpu::replay`].
pub struct Graph(drv::CudaGraph);

impl Graph {
    /// Number of nodes (kernels, copies) in the graph.
    pub fn nodes(&self) -> Result<usize, CudaError> {
        let mut n = 0usize;
        // SAFETY: a null node array asks only for the count.
        unsafe {
            drv::sys::cuGraphGetNodes(self.0.cu_graph(), std::ptr::null_mut(), &mut n).result()?;
        }
        Ok(n)
    }
}

// SAFETY: like the `Gpu` it was captured on, a graph is created, launched and destroyed on
// the one thread that owns the backend; it is only moved between threads as a whole.
unsafe impl Send for Graph {}

impl Gpu {
    /// Copies the first `words` words of `src` to byte `offset` of `dst` on the compute
    /// stream, without waiting. `src` must not change until the stream has passed the copy.
    pub fn htod_pinned(
        &self,
        src: &PinnedWords,
        words: usize,
        dst: u64,
        dst_len: usize,
    ) -> Result<(), CudaError> {
        if words > src.len || words * 4 > dst_len {
            return Err(CudaError::Shape(
                "pinned upload past the end of a buffer".into(),
            ));
        }
        if words == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked; page-locked memory, so the copy is truly asynchronous.
        unsafe {
            drv::sys::cuMemcpyHtoDAsync_v2(
                dst,
                src.ptr() as *const _,
                words * 4,
                self.compute.cu_stream(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Queues a copy of `words` words from device address `src` into `dst` (read it after
    /// [`Gpu::sync`]).
    pub fn dtoh_pinned(
        &self,
        src: u64,
        words: usize,
        dst: &mut PinnedWords,
    ) -> Result<(), CudaError> {
        if words > dst.len {
            return Err(CudaError::Shape(
                "pinned download past the end of a buffer".into(),
            ));
        }
        if words == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked; the caller synchronises before reading `dst`.
        unsafe {
            drv::sys::cuMemcpyDtoHAsync_v2(
                dst.ptr() as *mut _,
                src,
                words * 4,
                self.compute.cu_stream(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Records everything `enqueue` puts on the compute stream into a graph instead of
    /// running it. Nothing in `enqueue` may synchronise, allocate or copy from pageable
    /// memory. The stream is out of capture mode again whatever `enqueue` returns.
    pub fn capture(
        &self,
        enqueue: impl FnOnce() -> Result<(), CudaError>,
    ) -> Result<Graph, CudaError> {
        self.compute
            .begin_capture(drv::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let queued = enqueue();
        let graph = self
            .compute
            .end_capture(drv::sys::CUgraphInstantiate_flags(0));
        queued?;
        match graph? {
            Some(g) => {
                g.upload()?;
                Ok(Graph(g))
            }
            None => Err(CudaError::Driver("stream capture produced no graph".into())),
        }
    }

    /// Launches a captured graph on the compute stream.
    pub fn replay(&self, graph: &Graph) -> Result<(), CudaError> {
        graph.0.launch()?;
        Ok(())
    }
}

/// The copy stream: KV blocks in and out of the pool while the compute stream runs steps.
/// Work on it is ordered against the compute stream only through events
/// ([`Gpu::copy_after_compute`], [`Gpu::compute_after_copy`]).
impl Gpu {
    /// An event recorded on `stream` now.
    pub fn record_on(&self, stream: &CudaStream) -> Result<CudaEvent, CudaError> {
        let e = self
            .ctx
            .new_event(Some(drv::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(stream)?;
        Ok(e)
    }

    /// Work queued on the copy stream from now on starts after what the compute stream
    /// holds now (the KV writes of the steps queued so far).
    pub fn copy_after_compute(&self) -> Result<(), CudaError> {
        let e = self.record_on(&self.compute)?;
        self.copy.wait(&e)?;
        Ok(())
    }

    /// Work queued on the compute stream from now on starts after what the copy stream
    /// holds now (an import's writes into blocks a later step reads).
    pub fn compute_after_copy(&self) -> Result<(), CudaError> {
        let e = self.record_on(&self.copy)?;
        self.compute.wait(&e)?;
        Ok(())
    }

    /// Host -> device on the copy stream from pageable memory (the driver stages it: `src`
    /// may go once this returns).
    pub fn copy_htod(&self, src: &[u8], dst: &DBuf) -> Result<(), CudaError> {
        if src.len() > dst.len() {
            return Err(CudaError::Shape("upload past the end of a buffer".into()));
        }
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: bounds checked; pageable source, so the call returns once it is staged.
        unsafe { drv::result::memcpy_htod_async(dst.ptr, src, self.copy.cu_stream())? };
        Ok(())
    }

    /// Queues `bytes` from device address `src` into `dst` at `offset` on the copy stream
    /// (read `dst` only once the stream has passed the copy).
    pub fn copy_dtoh_pinned(
        &self,
        src: u64,
        dst: &mut PinnedBytes,
        offset: usize,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if offset + bytes > dst.len {
            return Err(CudaError::Shape(
                "pinned download past the end of a buffer".into(),
            ));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked; page-locked memory the caller keeps until the copy is done.
        unsafe {
            drv::sys::cuMemcpyDtoHAsync_v2(
                dst.ptr.add(offset) as *mut _,
                src,
                bytes,
                self.copy.cu_stream(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Whether all of `host` lies in page-locked memory that this process allocated through
    /// CUDA (e.g. another backend's exported [`PinnedBytes`]): such bytes can be uploaded by
    /// DMA with [`Gpu::copy_htod_locked`], with no staging copy. Pageable memory answers
    /// false (the driver reports an invalid value for it).
    pub fn is_page_locked(&self, host: &[u8]) -> bool {
        let Some(last) = host.len().checked_sub(1) else {
            return false;
        };
        let host_type = |addr: *const u8| {
            let mut ty: u32 = 0;
            // SAFETY: `ty` is the u32 the MEMORY_TYPE attribute writes; the call only
            // queries the driver's address table.
            let r = unsafe {
                drv::sys::cuPointerGetAttribute(
                    (&mut ty as *mut u32).cast(),
                    drv::sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                    addr as u64,
                )
            };
            r == drv::sys::CUresult::CUDA_SUCCESS
                && ty == drv::sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32
        };
        // A slice is one allocation's bytes: both ends page-locked means all of it.
        host_type(host.as_ptr()) && host_type(host[last..].as_ptr())
    }

    /// Queues an upload of `src` (page-locked: [`Gpu::is_page_locked`]) to device address
    /// `dst` on the copy stream. The caller keeps `src` alive and unchanged until the copy
    /// stream has passed the copy.
    pub fn copy_htod_locked(&self, src: &[u8], dst: u64) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        if !self.is_page_locked(src) {
            return Err(CudaError::Shape(
                "an asynchronous upload from memory that is not page-locked".into(),
            ));
        }
        // SAFETY: page-locked host memory the caller keeps until the copy is done.
        unsafe {
            drv::sys::cuMemcpyHtoDAsync_v2(
                dst,
                src.as_ptr() as *const _,
                src.len(),
                self.copy.cu_stream(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Queues `bytes` from `src` at `offset` to device address `dst` on the copy stream
    /// (`src` must not change until the stream has passed the copy).
    pub fn copy_htod_pinned(
        &self,
        src: &PinnedBytes,
        offset: usize,
        dst: u64,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if offset + bytes > src.len {
            return Err(CudaError::Shape(
                "pinned upload past the end of a buffer".into(),
            ));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked; page-locked memory the caller keeps until the copy is done.
        unsafe {
            drv::sys::cuMemcpyHtoDAsync_v2(
                dst,
                src.ptr.add(offset) as *const _,
                bytes,
                self.copy.cu_stream(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Queues the `copy_segments` kernel on the copy stream: `n` segments of `seg_bytes`
    /// (a multiple of 16), their (source, destination) addresses at byte `offset` of `pairs`.
    pub fn copy_segments(
        &self,
        pairs: &DBuf,
        offset: usize,
        n: usize,
        seg_bytes: usize,
    ) -> Result<(), CudaError> {
        if seg_bytes % 16 != 0 || pairs.len() < offset + n * 16 {
            return Err(CudaError::Shape(format!(
                "copy_segments: {n} segments of {seg_bytes} bytes (needs a multiple of 16)"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let grid = n.min(65535) as u32;
        self.launch_on(
            &self.copy,
            &self.k.copy_segments,
            (grid, 1, 1),
            256,
            &[
                Arg::P(pairs.ptr + offset as u64),
                Arg::I(n as i32),
                Arg::I((seg_bytes / 16) as i32),
            ],
        )
    }

    /// Waits for everything queued on the copy stream.
    pub fn sync_copy(&self) -> Result<(), CudaError> {
        self.copy.synchronize()?;
        Ok(())
    }
}

/// Milliseconds between two recorded events (synchronises on `end`).
pub fn elapsed_ms(start: &CudaEvent, end: &CudaEvent) -> Result<f32, CudaError> {
    end.synchronize()?;
    Ok(start.elapsed_ms(end)?)
}
