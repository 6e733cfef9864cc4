//! Weight tensors as loaded from a file: raw bytes in their on-disk encoding plus a dtype and
//! a shape. Quantized weights stay quantized; each backend decides how to consume them.

use memmap2::Mmap;
use std::sync::Arc;

/// Element encodings a weight can have. Discriminants are ggml's type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    BF16 = 30,
}

impl DType {
    /// Elements per quantization block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q8_0 => 32,
        }
    }

    /// Bytes per quantization block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q8_0 => 34,
        }
    }

    /// Bytes needed for `elems` elements, or `None` when `elems` is not a whole number of
    /// blocks (a corrupt shape).
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        let be = self.block_elems();
        (elems % be == 0).then(|| elems / be * self.block_bytes())
    }

    pub fn from_ggml(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            30 => DType::BF16,
            _ => return None,
        })
    }
}

/// Where a tensor's bytes live: inside a memory-mapped file (zero copy), or owned.
#[derive(Clone, Debug)]
pub enum Storage {
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Storage::Owned(v) => v,
        }
    }
}

/// One weight tensor. `shape` is outermost-first (row-major): a linear layer's weight is
/// `[out_features, in_features]`, each row contiguous, as ggml stores it.
#[derive(Clone, Debug)]
pub struct WeightTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl WeightTensor {
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of a 2-D tensor (1 for a vector).
    pub fn rows(&self) -> usize {
        if self.shape.len() < 2 {
            1
        } else {
            self.shape[..self.shape.len() - 1].iter().product()
        }
    }

    /// Length of the innermost dimension.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}
