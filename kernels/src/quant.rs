//! Dequantization of ggml block formats (and plain float encodings) to `f32`.
//!
//! Block layouts (32 elements per block, little-endian, `d`/`m` are IEEE f16):
//! - Q4_0 (18 bytes): `d`, then 16 bytes of nibbles. Element `j` (0..16) is the low nibble of
//!   byte `j`, element `j + 16` its high nibble; value = `(nibble - 8) * d`.
//! - Q4_1 (20 bytes): `d`, `m`, then 16 bytes of nibbles as in Q4_0; value = `nibble * d + m`.
//! - Q8_0 (34 bytes): `d`, then 32 signed bytes; value = `q * d`.
//!
//! The block helpers are public so backends can dequantize a block at a time inside their own
//! kernels instead of materializing whole matrices.

use crate::tensor::{DType, WeightTensor};
use half::{bf16, f16};

/// Elements per block of the 32-element formats (`QK4_0`, `QK4_1`, `QK8_0` in ggml).
pub const QK: usize = 32;
pub const Q4_0_BLOCK_BYTES: usize = 2 + QK / 2;
pub const Q4_1_BLOCK_BYTES: usize = 2 + 2 + QK / 2;
pub const Q8_0_BLOCK_BYTES: usize = 2 + QK;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{dtype:?}: {elems} elements is not a whole number of {block}-element blocks")]
    PartialBlock {
        dtype: DType,
        elems: usize,
        block: usize,
    },
    #[error("{dtype:?}: {elems} elements need {expected} bytes, got {got}")]
    SizeMismatch {
        dtype: DType,
        elems: usize,
        expected: usize,
        got: usize,
    },
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One Q4_0 block (exactly [`Q4_0_BLOCK_BYTES`]) into 32 floats.
#[inline]
pub fn dequantize_block_q4_0(block: &[u8; Q4_0_BLOCK_BYTES], out: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    let qs = &block[2..];
    for j in 0..QK / 2 {
        out[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        out[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// One Q4_1 block (exactly [`Q4_1_BLOCK_BYTES`]) into 32 floats.
#[inline]
pub fn dequantize_block_q4_1(block: &[u8; Q4_1_BLOCK_BYTES], out: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..];
    for j in 0..QK / 2 {
        out[j] = (qs[j] & 0x0F) as f32 * d + m;
        out[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// One Q8_0 block (exactly [`Q8_0_BLOCK_BYTES`]) into 32 floats.
#[inline]
pub fn dequantize_block_q8_0(block: &[u8; Q8_0_BLOCK_BYTES], out: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[2..]) {
        *o = (q as i8) as f32 * d;
    }
}

/// Dequantizes `out.len()` elements encoded as `dtype` in `bytes` (a row, or any run of whole
/// blocks). `bytes` must be exactly the encoded size of `out.len()` elements.
pub fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let elems = out.len();
    let expected = dtype.bytes_for(elems).ok_or(QuantError::PartialBlock {
        dtype,
        elems,
        block: dtype.block_elems(),
    })?;
    if bytes.len() != expected {
        return Err(QuantError::SizeMismatch {
            dtype,
            elems,
            expected,
            got: bytes.len(),
        });
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q4_0 => blocks(bytes, out, dequantize_block_q4_0),
        DType::Q4_1 => blocks(bytes, out, dequantize_block_q4_1),
        DType::Q8_0 => blocks(bytes, out, dequantize_block_q8_0),
    }
    Ok(())
}

fn blocks<const B: usize>(bytes: &[u8], out: &mut [f32], f: fn(&[u8; B], &mut [f32; QK])) {
    for (block, o) in bytes.chunks_exact(B).zip(out.chunks_exact_mut(QK)) {
        if let (Ok(block), Ok(o)) = (<&[u8; B]>::try_from(block), <&mut [f32; QK]>::try_from(o)) {
            f(block, o);
        }
    }
}

/// Dequantizes a whole tensor (row-major, `numel` floats).
pub fn dequantize_tensor(t: &WeightTensor) -> Result<Vec<f32>, QuantError> {
    let mut out = vec![0.0f32; t.numel()];
    dequantize_row(t.dtype, t.bytes(), &mut out)?;
    Ok(out)
}

/// Dequantizes row `row` of a 2-D tensor into `out` (length = `t.cols()`).
pub fn dequantize_tensor_row(
    t: &WeightTensor,
    row: usize,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let row_bytes = t
        .dtype
        .bytes_for(t.cols())
        .ok_or(QuantError::PartialBlock {
            dtype: t.dtype,
            elems: t.cols(),
            block: t.dtype.block_elems(),
        })?;
    let start = row.saturating_mul(row_bytes);
    let bytes = t
        .bytes()
        .get(start..start.saturating_add(row_bytes))
        .ok_or(QuantError::SizeMismatch {
            dtype: t.dtype,
            elems: t.cols(),
            expected: start.saturating_add(row_bytes),
            got: t.bytes().len(),
        })?;
    dequantize_row(t.dtype, bytes, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&h(0.5));
        // byte j: low nibble j % 16, high nibble 15 - j % 16
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut out = [0.0; 32];
        dequantize_row(DType::Q4_0, &b, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&h(0.25));
        b.extend_from_slice(&h(-1.0));
        for j in 0..16u8 {
            b.push((j % 16) | (((j + 3) % 16) << 4));
        }
        let mut out = [0.0; 32];
        dequantize_row(DType::Q4_1, &b, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.0);
            assert_eq!(out[j + 16], ((j + 3) % 16) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q8_0_two_blocks() {
        let mut b = Vec::new();
        for (d, sign) in [(2.0f32, 1i32), (0.125, -1)] {
            b.extend_from_slice(&h(d));
            for j in 0..32i32 {
                b.push(((j - 16) * sign) as i8 as u8);
            }
        }
        let mut out = [0.0; 64];
        dequantize_row(DType::Q8_0, &b, &mut out).unwrap();
        for j in 0..32 {
            assert_eq!(out[j], (j as f32 - 16.0) * 2.0);
            assert_eq!(out[32 + j], -(j as f32 - 16.0) * 0.125);
        }
    }

    #[test]
    fn float_encodings() {
        let vals = [1.5f32, -2.0, 0.0, 65504.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16b: Vec<u8> = vals.iter().flat_map(|v| h(*v)).collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        for (dt, b) in [(DType::F32, f32b), (DType::F16, f16b), (DType::BF16, bf16b)] {
            let mut out = [9.0; 4];
            dequantize_row(dt, &b, &mut out).unwrap();
            assert_eq!(out[..3], vals[..3], "{dt:?}");
        }
    }

    #[test]
    fn size_errors() {
        let mut out = [0.0; 31];
        assert!(matches!(
            dequantize_row(DType::Q4_0, &[0; 18], &mut out),
            Err(QuantError::PartialBlock { .. })
        ));
        let mut out = [0.0; 32];
        assert!(matches!(
            dequantize_row(DType::Q4_1, &[0; 18], &mut out),
            Err(QuantError::SizeMismatch { .. })
        ));
    }
}
