//! KV blocks in and out of a [`CudaBackend`]'s pool on the **copy stream**, so the compute
//! stream keeps running steps while KV crosses (disaggregated serving: a prefill worker
//! exports a finished prompt's blocks, a decode worker imports them).
//!
//! Every move is one `copy_segments` kernel over (source, destination) address pairs, one
//! pair per (layer, block, K or V) segment: each byte is read once and written once, like a
//! device memcpy, whatever order the blocks sit in. Three paths:
//!
//! - [`CudaBackend::pull_blocks_device`]: pool to pool between two backends of one process
//!   on one device (both hold the device's primary context, so the other pool's addresses
//!   are valid here): no host round trip.
//! - [`CudaBackend::start_export`]: layer by layer into page-locked host memory (gather the
//!   layer's blocks into a device staging buffer, then one DMA to the host), in the transfer
//!   plane's chunk order (layer `l`: K then V of each block, in block order); each layer has
//!   an event, so a sender can ship layer 0 while later layers are still being copied.
//! - [`CudaBackend::start_import`] + [`CudaBackend::import_layer`]: the reverse, one layer
//!   at a time as chunks arrive.
//!
//! What a GPU worker's executor calls (`Backend::export_layer_chunks` /
//! `import_layer_chunks`) sits on the last two: an export's layer chunks are `Bytes` slices
//! of the page-locked buffer itself (no host copy; the buffer goes back to the backend's
//! [`PinnedPool`] when the transfer plane drops the last slice), and an import uploads a
//! chunk by DMA straight from where it lies when that is page-locked (a pull inside one
//! process hands over the exporter's slices), else through the kept staging buffer.
//!
//! Ordering: the copy stream waits for the steps queued on the compute stream before it
//! reads blocks (an export) and the compute stream waits for the copy stream before the next
//! step reads imported blocks. The caller keeps the blocks held (not reused) until a job is
//! finished; a job dropped unfinished waits for its copies before freeing its buffers.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::CudaBackend;
use crate::backend::{BackendError, KvLayout};
use crate::cuda::device::{elapsed_ms, DBuf, PinnedBytes};

/// Where a backend's KV pool lives on the device: what a second backend of the same process
/// on the same device needs to copy blocks straight out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPool {
    /// CUDA device ordinal.
    pub device: usize,
    pub layout: KvLayout,
    /// Device address of each layer's K and V pool.
    pub k: Vec<u64>,
    pub v: Vec<u64>,
}

impl KvPool {
    /// Bytes of one (layer, block) K or V segment.
    pub fn segment_bytes(&self) -> usize {
        self.layout.elems_per_layer_block() * self.layout.dtype.size_bytes()
    }

    fn same_shape(&self, other: &KvLayout) -> bool {
        KvLayout {
            num_blocks: other.num_blocks,
            ..self.layout
        } == *other
    }
}

/// An export in flight: `layers` chunks landing in page-locked host memory.
pub struct KvExportJob {
    /// Always `Some` until [`KvExportJob::finish`] takes it.
    host: Option<PinnedBytes>,
    layer_bytes: usize,
    layers: Vec<CudaEvent>,
    start: CudaEvent,
    copy: Arc<CudaStream>,
    _staging: DBuf,
    _pairs: DBuf,
}

impl KvExportJob {
    /// Layer chunks in all.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of one layer chunk.
    pub fn layer_bytes(&self) -> usize {
        self.layer_bytes
    }

    /// Waits for layer `l`'s copy and returns its chunk.
    pub fn layer(&self, l: usize) -> Result<&[u8], BackendError> {
        let Some(done) = self.layers.get(l) else {
            return Err(BackendError::Device(format!(
                "layer {l} of an export of {} layers",
                self.layers.len()
            )));
        };
        done.synchronize().map_err(device_err)?;
        let host = self.host.as_ref().map_or(&[][..], PinnedBytes::as_slice);
        Ok(&host[l * self.layer_bytes..(l + 1) * self.layer_bytes])
    }

    /// Waits for every layer; returns the host buffer (the chunks in layer order) and the
    /// copy's device time.
    pub fn finish(mut self) -> Result<(PinnedBytes, Duration), BackendError> {
        let time = match self.layers.last() {
            Some(end) => elapsed_ms(&self.start, end)?,
            None => 0.0,
        };
        self.copy.synchronize().map_err(device_err)?;
        let host = self
            .host
            .take()
            .ok_or_else(|| BackendError::Device("export already finished".into()))?;
        Ok((host, Duration::from_secs_f64(f64::from(time) / 1e3)))
    }
}

impl Drop for KvExportJob {
    fn drop(&mut self) {
        // The copies must be over before the buffers they write go.
        let _ = self.copy.synchronize();
    }
}

/// An import in flight: layer chunks pushed with [`CudaBackend::import_layer`].
pub struct KvImportJob {
    ids: Vec<u32>,
    /// Where pushed chunks are staged on the host (allocated at the first push).
    host: Option<PinnedBytes>,
    layer_bytes: usize,
    pushed: Vec<bool>,
    start: Option<CudaEvent>,
    copy: Arc<CudaStream>,
    staging: DBuf,
    pairs: DBuf,
}

impl KvImportJob {
    /// Bytes of one layer chunk.
    pub fn layer_bytes(&self) -> usize {
        self.layer_bytes
    }
}

impl Drop for KvImportJob {
    fn drop(&mut self) {
        let _ = self.copy.synchronize();
    }
}

/// Most page-locked bytes a [`PinnedPool`] keeps for reuse; buffers beyond are freed.
const POOL_KEEP_BYTES: usize = 2 << 30;

/// Page-locked buffers kept between KV exports and imports: pinning hundreds of MB takes
/// longer than copying them. Buffers come back from finished imports and from exported
/// chunks once the transfer plane has dropped them (from any thread).
pub(crate) struct PinnedPool {
    ctx: Arc<CudaContext>,
    kept: Mutex<Vec<PinnedBytes>>,
}

impl PinnedPool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> PinnedPool {
        PinnedPool {
            ctx,
            kept: Mutex::new(Vec::new()),
        }
    }

    /// The smallest kept buffer of at least `bytes`, if any.
    fn take(&self, bytes: usize) -> Option<PinnedBytes> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let best = kept
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= bytes)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i)?;
        Some(kept.swap_remove(best))
    }

    /// Keeps `buf`, then frees the smallest buffers while more than [`POOL_KEEP_BYTES`]
    /// are kept.
    fn keep(&self, buf: PinnedBytes) {
        let mut freed = Vec::new();
        {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            kept.push(buf);
            kept.sort_by_key(|b| std::cmp::Reverse(b.len()));
            let mut total = 0usize;
            let mut keep = 0;
            for b in kept.iter() {
                if keep > 0 && total + b.len() > POOL_KEEP_BYTES {
                    break;
                }
                total += b.len();
                keep += 1;
            }
            freed.extend(kept.drain(keep..));
        }
        if !freed.is_empty() {
            // cuMemFreeHost needs the context current on this thread (any thread may keep).
            let _ = self.ctx.bind_to_thread();
            drop(freed);
        }
    }
}

/// The owner behind an export's layer-chunk `Bytes`: the page-locked buffer, returned to
/// its pool when the last slice is dropped.
struct PooledChunks {
    buf: Option<PinnedBytes>,
    len: usize,
    pool: Weak<PinnedPool>,
    ctx: Arc<CudaContext>,
}

impl AsRef<[u8]> for PooledChunks {
    fn as_ref(&self) -> &[u8] {
        self.buf
            .as_ref()
            .map_or(&[][..], |b| &b.as_slice()[..self.len])
    }
}

impl Drop for PooledChunks {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        match self.pool.upgrade() {
            Some(pool) => pool.keep(buf),
            None => {
                let _ = self.ctx.bind_to_thread();
                drop(buf);
            }
        }
    }
}

fn device_err(e: impl std::fmt::Debug) -> BackendError {
    BackendError::Device(format!("{e:?}"))
}

/// The pairs as the kernel reads them: (source, destination) per segment.
fn pair_words(pairs: &[(u64, u64)]) -> Vec<u8> {
    pairs
        .iter()
        .flat_map(|&(s, d)| s.to_le_bytes().into_iter().chain(d.to_le_bytes()))
        .collect()
}

impl CudaBackend {
    /// This backend's pool, for [`CudaBackend::pull_blocks_device`] on another backend.
    pub fn kv_pool(&self) -> KvPool {
        KvPool {
            device: self.gpu.ctx.ordinal(),
            layout: self.layout,
            k: self.kcache.iter().map(DBuf::ptr).collect(),
            v: self.vcache.iter().map(DBuf::ptr).collect(),
        }
    }

    /// A kept page-locked buffer that holds `bytes`, else a new one.
    pub(super) fn take_kv_host(&self, bytes: usize) -> Result<PinnedBytes, BackendError> {
        match self.kv_host.take(bytes) {
            Some(h) => Ok(h),
            None => Ok(PinnedBytes::new(&self.gpu, bytes)?),
        }
    }

    /// Keeps `host` for a later export or import.
    pub(super) fn keep_kv_host(&self, host: PinnedBytes) {
        self.kv_host.keep(host);
    }

    /// Blocks `ids` as one `Bytes` chunk per layer (see `Backend::export_layer_chunks`),
    /// slices of one page-locked buffer written on the copy stream: the compute stream runs
    /// on meanwhile, and the buffer returns to the pool when the last chunk is dropped.
    pub(super) fn export_pinned_chunks(&self, ids: &[u32]) -> Result<Vec<Bytes>, BackendError> {
        let total = self.export_bytes(ids.len());
        let host = self.take_kv_host(total)?;
        let job = self.start_export(ids, host)?;
        let layer_bytes = job.layer_bytes();
        let (host, _) = job.finish()?;
        let all = Bytes::from_owner(PooledChunks {
            buf: Some(host),
            len: total,
            pool: Arc::downgrade(&self.kv_host),
            ctx: self.gpu.ctx.clone(),
        });
        Ok((0..self.layout.n_layers)
            .map(|l| all.slice(l * layer_bytes..(l + 1) * layer_bytes))
            .collect())
    }

    /// Writes one chunk per layer into blocks `ids` (see `Backend::import_layer_chunks`):
    /// a page-locked chunk (an export of this process) goes up by DMA from where it lies,
    /// any other through the kept staging buffer; each layer's scatter follows its upload
    /// on the copy stream, and the next step waits for the last.
    pub(super) fn import_chunks(
        &mut self,
        ids: &[u32],
        chunks: &[Bytes],
    ) -> Result<(), BackendError> {
        crate::kv_chunks::check_chunks(&self.layout, ids.len(), chunks)?;
        if ids.is_empty() {
            return Ok(());
        }
        let mut job = self.start_import(ids)?;
        for (l, chunk) in chunks.iter().enumerate() {
            if self.gpu.is_page_locked(chunk) {
                self.queue_import_locked(&mut job, l, chunk)?;
            } else {
                self.import_layer(&mut job, l, chunk)?;
            }
        }
        // `chunks` outlive the copies: finish_import waits for the copy stream.
        self.finish_import(job)?;
        Ok(())
    }

    pub(super) fn check_ids(&self, ids: &[u32]) -> Result<(), BackendError> {
        ids.iter().try_for_each(|&b| self.check_block(b))
    }

    /// Uploads `pairs` on the copy stream (after the compute stream's queued work, which
    /// also orders the buffer's allocation).
    fn upload_pairs(&self, pairs: &[(u64, u64)]) -> Result<DBuf, BackendError> {
        let buf = self.gpu.alloc(pairs.len() * 16)?;
        self.gpu.copy_after_compute()?;
        self.gpu.copy_htod(&pair_words(pairs), &buf)?;
        Ok(buf)
    }

    /// Copies blocks `src_ids` of `src` into this pool's `dst_ids`, device to device on this
    /// backend's copy stream, with no host round trip. `src` must be a pool of this process
    /// on this device (another backend's [`CudaBackend::kv_pool`]), its writes complete
    /// (every backend call ends synchronised) and its blocks held until this returns. Later
    /// steps on this backend see the blocks. Returns the copy's device time.
    pub fn pull_blocks_device(
        &mut self,
        src: &KvPool,
        src_ids: &[u32],
        dst_ids: &[u32],
    ) -> Result<Duration, BackendError> {
        if src.device != self.gpu.ctx.ordinal() || !src.same_shape(&self.layout) {
            return Err(BackendError::BadConfig(format!(
                "a device copy needs two pools of one shape on one device: {:?} on {} vs {:?} on {}",
                src.layout,
                src.device,
                self.layout,
                self.gpu.ctx.ordinal()
            )));
        }
        if src_ids.len() != dst_ids.len()
            || src.k.len() != self.layout.n_layers
            || src.v.len() != self.layout.n_layers
        {
            return Err(BackendError::BadConfig(format!(
                "{} source blocks for {} destination blocks",
                src_ids.len(),
                dst_ids.len()
            )));
        }
        if let Some(&bad) = src_ids
            .iter()
            .find(|&&b| b as usize >= src.layout.num_blocks)
        {
            return Err(BackendError::BadBlockId {
                block: bad,
                num_blocks: src.layout.num_blocks,
            });
        }
        self.check_ids(dst_ids)?;
        if src_ids.is_empty() {
            return Ok(Duration::ZERO);
        }
        let seg = src.segment_bytes();
        let mut pairs = Vec::with_capacity(2 * self.layout.n_layers * src_ids.len());
        for l in 0..self.layout.n_layers {
            for (from, to) in [(src.k[l], &self.kcache[l]), (src.v[l], &self.vcache[l])] {
                for (&s, &d) in src_ids.iter().zip(dst_ids) {
                    pairs.push((
                        from + (s as usize * seg) as u64,
                        to.ptr() + (d as usize * seg) as u64,
                    ));
                }
            }
        }
        self.copy_pairs(&pairs, seg)
    }

    /// Copies every (source, destination) segment of `seg` bytes in `pairs` on the copy
    /// stream (after the compute stream's queued work; later steps wait for it), and waits
    /// for it. Returns the copy's device time.
    pub(super) fn copy_pairs(
        &mut self,
        pairs: &[(u64, u64)],
        seg: usize,
    ) -> Result<Duration, BackendError> {
        if pairs.is_empty() {
            return Ok(Duration::ZERO);
        }
        let buf = self.upload_pairs(pairs)?;
        let start = self.gpu.record_on(&self.gpu.copy)?;
        self.gpu.copy_segments(&buf, 0, pairs.len(), seg)?;
        let end = self.gpu.record_on(&self.gpu.copy)?;
        self.gpu.compute_after_copy()?;
        let ms = elapsed_ms(&start, &end)?;
        self.gpu.sync_copy()?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    /// Bytes [`CudaBackend::start_export`] writes for `blocks` blocks (every layer).
    pub fn export_bytes(&self, blocks: usize) -> usize {
        self.layout.bytes_per_block() * blocks
    }

    /// Starts copying blocks `ids` into `host` (page-locked, at least
    /// [`CudaBackend::export_bytes`]; kept by the caller across exports, since pinning memory
    /// is slow) on the copy stream, one chunk per layer (layer `l`: K then V of each block, in
    /// `ids` order). It waits only for the steps queued so far; the compute stream runs on
    /// meanwhile. [`KvExportJob::finish`] hands `host` back.
    pub fn start_export(
        &self,
        ids: &[u32],
        host: PinnedBytes,
    ) -> Result<KvExportJob, BackendError> {
        self.check_ids(ids)?;
        let seg = self.block_span(0).1;
        let layer_bytes = 2 * seg * ids.len();
        let n_layers = self.layout.n_layers;
        if host.len() < layer_bytes * n_layers {
            return Err(BackendError::KvDataSize {
                got: host.len(),
                expected: layer_bytes * n_layers,
            });
        }
        let staging = self.gpu.alloc(layer_bytes.max(1))?;
        let mut pairs = Vec::with_capacity(2 * ids.len() * n_layers);
        for l in 0..n_layers {
            for (i, &b) in ids.iter().enumerate() {
                let (off, _) = self.block_span(b);
                let at = staging.ptr() + (2 * i * seg) as u64;
                pairs.push((self.kcache[l].ptr() + off as u64, at));
                pairs.push((self.vcache[l].ptr() + off as u64, at + seg as u64));
            }
        }
        let pair_buf = self.upload_pairs(&pairs)?;
        let start = self.gpu.record_on(&self.gpu.copy)?;
        let mut host = host;
        let mut layers = Vec::with_capacity(n_layers);
        let per_layer = 2 * ids.len();
        for l in 0..n_layers {
            // In stream order: this layer's gather waits for the previous layer's download
            // out of the one staging buffer.
            self.gpu
                .copy_segments(&pair_buf, l * per_layer * 16, per_layer, seg)?;
            self.gpu
                .copy_dtoh_pinned(staging.ptr(), &mut host, l * layer_bytes, layer_bytes)?;
            layers.push(self.gpu.record_on(&self.gpu.copy)?);
        }
        Ok(KvExportJob {
            host: Some(host),
            layer_bytes,
            layers,
            start,
            copy: self.gpu.copy.clone(),
            _staging: staging,
            _pairs: pair_buf,
        })
    }

    /// Starts an import into blocks `ids`: push each layer chunk (the order
    /// [`CudaBackend::start_export`] writes) with [`CudaBackend::import_layer`], then
    /// [`CudaBackend::finish_import`].
    pub fn start_import(&mut self, ids: &[u32]) -> Result<KvImportJob, BackendError> {
        self.check_ids(ids)?;
        let seg = self.block_span(0).1;
        let layer_bytes = 2 * seg * ids.len();
        let n_layers = self.layout.n_layers;
        let staging = self.gpu.alloc(layer_bytes.max(1))?;
        let mut pairs = Vec::with_capacity(2 * ids.len() * n_layers);
        for l in 0..n_layers {
            for (i, &b) in ids.iter().enumerate() {
                let (off, _) = self.block_span(b);
                let at = staging.ptr() + (2 * i * seg) as u64;
                pairs.push((at, self.kcache[l].ptr() + off as u64));
                pairs.push((at + seg as u64, self.vcache[l].ptr() + off as u64));
            }
        }
        let pair_buf = self.upload_pairs(&pairs)?;
        Ok(KvImportJob {
            ids: ids.to_vec(),
            host: None,
            layer_bytes,
            pushed: vec![false; n_layers],
            start: None,
            copy: self.gpu.copy.clone(),
            staging,
            pairs: pair_buf,
        })
    }

    /// Queues layer `l`'s chunk of `job` on the copy stream (copied into a page-locked
    /// staging buffer first, the backend's kept one when it is large enough, so `chunk` may
    /// go at once).
    pub fn import_layer(
        &mut self,
        job: &mut KvImportJob,
        l: usize,
        chunk: &[u8],
    ) -> Result<(), BackendError> {
        if chunk.len() != job.layer_bytes {
            return Err(BackendError::KvDataSize {
                got: chunk.len(),
                expected: job.layer_bytes,
            });
        }
        let lb = job.layer_bytes;
        let mut host = match job.host.take() {
            Some(h) => h,
            None => self.take_kv_host(lb * job.pushed.len())?,
        };
        if l < job.pushed.len() && !job.pushed[l] {
            // Not in flight yet: its slot is free to write.
            host.as_mut_slice()[l * lb..(l + 1) * lb].copy_from_slice(chunk);
        }
        let queued = self.queue_import_layer(job, l, &host, l * lb);
        job.host = Some(host);
        queued
    }

    /// Queues every layer of `job` from `src` (page-locked, the chunks in layer order, as
    /// [`KvExportJob::finish`] returns them): no host copy at all. `src` must stay until
    /// the job is finished.
    pub fn import_pinned(
        &mut self,
        job: &mut KvImportJob,
        src: &PinnedBytes,
    ) -> Result<(), BackendError> {
        for l in 0..job.pushed.len() {
            self.queue_import_layer(job, l, src, l * job.layer_bytes)?;
        }
        Ok(())
    }

    fn queue_import_layer(
        &mut self,
        job: &mut KvImportJob,
        l: usize,
        src: &PinnedBytes,
        offset: usize,
    ) -> Result<(), BackendError> {
        if l >= job.pushed.len() || job.pushed[l] {
            return Err(BackendError::Device(format!(
                "layer {l} of an import of {} layers pushed twice or out of range",
                job.pushed.len()
            )));
        }
        if job.start.is_none() {
            job.start = Some(self.gpu.record_on(&self.gpu.copy)?);
        }
        let per_layer = 2 * job.ids.len();
        let seg = self.block_span(0).1;
        // In stream order: this upload waits for the previous layer's scatter out of the
        // one staging buffer.
        self.gpu
            .copy_htod_pinned(src, offset, job.staging.ptr(), job.layer_bytes)?;
        self.gpu
            .copy_segments(&job.pairs, l * per_layer * 16, per_layer, seg)?;
        job.pushed[l] = true;
        Ok(())
    }

    /// Like `queue_import_layer`, from page-locked memory outside the job's buffers (the
    /// caller keeps it until the job is finished).
    fn queue_import_locked(
        &mut self,
        job: &mut KvImportJob,
        l: usize,
        chunk: &[u8],
    ) -> Result<(), BackendError> {
        if l >= job.pushed.len() || job.pushed[l] || chunk.len() != job.layer_bytes {
            return Err(BackendError::Device(format!(
                "layer {l} of an import of {} layers pushed twice, out of range or of {} bytes",
                job.pushed.len(),
                chunk.len()
            )));
        }
        if job.start.is_none() {
            job.start = Some(self.gpu.record_on(&self.gpu.copy)?);
        }
        let per_layer = 2 * job.ids.len();
        let seg = self.block_span(0).1;
        self.gpu.copy_htod_locked(chunk, job.staging.ptr())?;
        self.gpu
            .copy_segments(&job.pairs, l * per_layer * 16, per_layer, seg)?;
        job.pushed[l] = true;
        Ok(())
    }

    /// Waits for `job`'s copies (every layer must have been pushed); later steps see the
    /// blocks. Returns the copy's device time.
    pub fn finish_import(&mut self, job: KvImportJob) -> Result<Duration, BackendError> {
        if let Some(missing) = job.pushed.iter().position(|p| !p) {
            return Err(BackendError::Device(format!(
                "import finished without layer {missing}"
            )));
        }
        let end = self.gpu.record_on(&self.gpu.copy)?;
        self.gpu.compute_after_copy()?;
        let ms = match &job.start {
            Some(start) => elapsed_ms(start, &end)?,
            None => 0.0,
        };
        self.gpu.sync_copy()?;
        let mut job = job;
        if let Some(host) = job.host.take() {
            self.keep_kv_host(host);
        }
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }
}
