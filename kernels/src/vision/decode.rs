//! Image bytes (PNG, JPEG, WebP) to RGB pixels, with limits checked before any pixel is
//! decoded, so a hostile header cannot make the server allocate gigabytes.
//!
//! WHY the format is sniffed from the bytes, not taken from a declared media type: clients
//! mislabel (`image/jpg` for a PNG); the bytes are what the decoder reads.

use image::{ImageFormat, ImageReader, Limits};
use std::io::Cursor;

/// What an image may be before it is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width or height in pixels.
    pub max_side: u32,
    /// Largest width × height.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_side: 8192,
            max_pixels: 33_554_432, // 32 Mpx: a 6000x4000 photo fits, 100 MB of RGB does not
        }
    }
}

/// A decoded image: 8-bit RGB, row-major, `3 * width * height` bytes (alpha dropped, as
/// PIL's `convert("RGB")` drops it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Pixel `(x, y)` as `[r, g, b]`; `None` outside the image.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = 3 * (y as usize * self.width as usize + x as usize);
        let p = self.pixels.get(i..i + 3)?;
        Some([p[0], p[1], p[2]])
    }
}

/// Why an image was refused. The messages are written for the client who sent it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("image format {0} is not supported (send PNG, JPEG or WebP)")]
    Unsupported(String),
    #[error("the data is not a recognised image (send PNG, JPEG or WebP)")]
    Unrecognised,
    #[error("image is {width}x{height} pixels, over the limit of {limit}")]
    TooLarge {
        width: u32,
        height: u32,
        limit: String,
    },
    #[error("image data is corrupt ({format}): {reason}")]
    Corrupt { format: String, reason: String },
}

/// The formats served.
fn served(format: ImageFormat) -> bool {
    matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    )
}

fn format_name(format: ImageFormat) -> String {
    format
        .extensions_str()
        .first()
        .map_or_else(|| format!("{format:?}"), |e| e.to_uppercase())
}

/// Sniffs, checks the header's dimensions against `limits`, then decodes to RGB.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let format = image::guess_format(bytes).map_err(|_| ImageError::Unrecognised)?;
    if !served(format) {
        return Err(ImageError::Unsupported(format_name(format)));
    }
    let corrupt = |e: image::ImageError| ImageError::Corrupt {
        format: format_name(format),
        reason: e.to_string(),
    };
    // The header is read with only the allocation bound, so an oversized image is reported
    // with its dimensions; the decode itself runs under every limit.
    let reader = |sides: bool| {
        let mut r = ImageReader::with_format(Cursor::new(bytes), format);
        let mut l = Limits::default();
        if sides {
            l.max_image_width = Some(limits.max_side);
            l.max_image_height = Some(limits.max_side);
        }
        // RGBA8 of the largest image allowed, plus the decoder's own buffers.
        l.max_alloc = Some(limits.max_pixels.saturating_mul(4).saturating_add(64 << 20));
        r.limits(l);
        r
    };
    let (width, height) = reader(false).into_dimensions().map_err(corrupt)?;
    if width > limits.max_side || height > limits.max_side {
        return Err(ImageError::TooLarge {
            width,
            height,
            limit: format!("{} pixels per side", limits.max_side),
        });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            limit: format!("{} pixels in all", limits.max_pixels),
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt {
            format: format_name(format),
            reason: format!("{width}x{height} pixels"),
        });
    }
    let rgb = reader(true).decode().map_err(corrupt)?.into_rgb8();
    Ok(RgbImage {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, RgbImage as Buf};

    fn encode(format: ImageFormat, w: u32, h: u32) -> Vec<u8> {
        let img = Buf::from_fn(w, h, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let mut out = Vec::new();
        match format {
            ImageFormat::Png => image::codecs::png::PngEncoder::new(&mut out)
                .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
                .unwrap(),
            ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
                .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
                .unwrap(),
            ImageFormat::WebP => image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
                .unwrap(),
            _ => unreachable!(),
        }
        out
    }

    #[test]
    fn png_and_webp_decode_exactly_jpeg_closely() {
        for format in [ImageFormat::Png, ImageFormat::WebP] {
            let img = decode(&encode(format, 5, 3), &DecodeLimits::default()).unwrap();
            assert_eq!((img.width, img.height), (5, 3));
            assert_eq!(img.pixel(4, 2), Some([40, 40, 7]), "{format:?}");
        }
        let img = decode(&encode(ImageFormat::Jpeg, 16, 8), &DecodeLimits::default()).unwrap();
        assert_eq!((img.width, img.height), (16, 8));
        let [r, g, _] = img.pixel(3, 1).unwrap();
        assert!(r.abs_diff(30) < 12 && g.abs_diff(20) < 12, "{r} {g}");
    }

    #[test]
    fn refusals_name_the_problem() {
        let limits = DecodeLimits {
            max_side: 8,
            max_pixels: 40,
        };
        let err = decode(&encode(ImageFormat::Png, 9, 2), &limits).unwrap_err();
        assert!(err.to_string().contains("9x2"), "{err}");
        let err = decode(&encode(ImageFormat::Png, 7, 7), &limits).unwrap_err();
        assert!(err.to_string().contains("40 pixels in all"), "{err}");
        let mut png = encode(ImageFormat::Png, 4, 4);
        png.truncate(40);
        let err = decode(&png, &limits).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
        let err = decode(b"GIF89a\x01\x00\x01\x00", &limits).unwrap_err();
        assert_eq!(err, ImageError::Unsupported("GIF".into()));
        let err = decode(b"hello, world", &limits).unwrap_err();
        assert_eq!(err, ImageError::Unrecognised);
    }
}
