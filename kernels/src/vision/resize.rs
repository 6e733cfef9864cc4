//! Image resizing as PIL's `Image.resize` does it for 8-bit images (the resampling the HF
//! processors use), so a processor's pixel values match the reference's exactly.
//!
//! PIL resamples separably: horizontal pass, then vertical, each a convolution whose kernel
//! is stretched by the scale when shrinking (antialiasing), with coefficients normalised to
//! sum to one, then rounded to fixed point (22 fractional bits); the intermediate image is
//! 8-bit. Only the filters the processors name are here.

use super::decode::RgbImage;

/// A resampling filter (PIL's numbering, as processor configs write it: `resample`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// PIL 1.
    Lanczos,
    /// PIL 2.
    Bilinear,
    /// PIL 3.
    Bicubic,
}

impl Filter {
    /// From a processor config's `resample`; `None` for filters not implemented here.
    pub fn from_pil(code: u64) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output index: the first input index and its fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let v = w * f64::from(1u32 << PRECISION_BITS);
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass along x (`horizontal`) or y of a `w x h` RGB buffer.
fn pass(src: &[u8], w: usize, h: usize, out_len: usize, horizontal: bool, f: Filter) -> Vec<u8> {
    let (in_len, other) = if horizontal { (w, h) } else { (h, w) };
    let coeffs = coefficients(in_len, out_len, f);
    let (ow, oh) = if horizontal {
        (out_len, h)
    } else {
        (w, out_len)
    };
    let mut out = vec![0u8; ow * oh * 3];
    for o in 0..other {
        for (i, (start, k)) in coeffs.iter().enumerate() {
            for ch in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (j, &kw) in k.iter().enumerate() {
                    let idx = if horizontal {
                        (o * w + start + j) * 3 + ch
                    } else {
                        ((start + j) * w + o) * 3 + ch
                    };
                    acc += i64::from(src[idx]) * i64::from(kw);
                }
                let oidx = if horizontal {
                    (o * ow + i) * 3 + ch
                } else {
                    (i * ow + o) * 3 + ch
                };
                out[oidx] = clip8(acc);
            }
        }
    }
    out
}

/// `img` resized to `width x height` as PIL resizes an RGB image (a copy when the size is
/// the same). Sizes must be positive.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let (nw, nh) = (width.max(1) as usize, height.max(1) as usize);
    let mut pixels = img.pixels.clone();
    let mut cur_w = w;
    if nw != w {
        pixels = pass(&pixels, w, h, nw, true, filter);
        cur_w = nw;
    }
    if nh != h {
        pixels = pass(&pixels, cur_w, h, nh, false, filter);
    }
    RgbImage {
        width: nw as u32,
        height: nh as u32,
        pixels,
    }
}

/// The `w x h` window at `(x, y)` of `img` (which must contain it).
pub fn crop(img: &RgbImage, x: u32, y: u32, w: u32, h: u32) -> RgbImage {
    let mut pixels = Vec::with_capacity(3 * (w * h) as usize);
    for row in y..y + h {
        let start = 3 * (row * img.width + x) as usize;
        pixels.extend_from_slice(&img.pixels[start..start + 3 * w as usize]);
    }
    RgbImage {
        width: w,
        height: h,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(56, 64), (64, 32), (7, 3), (3, 7)] {
            for (_, k) in coefficients(i, o, Filter::Lanczos) {
                let sum: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{sum}"
                );
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let img = RgbImage {
            width: 5,
            height: 4,
            pixels: [10u8, 200, 77].repeat(20),
        };
        let out = resize(&img, 9, 3, Filter::Lanczos);
        assert_eq!((out.width, out.height), (9, 3));
        assert!(out.pixels.chunks(3).all(|p| p == [10, 200, 77]));
    }
}
