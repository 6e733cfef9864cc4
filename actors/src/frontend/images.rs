//! Images in chat requests: `{"type": "image_url", "image_url": {"url": ...}}` content parts.
//!
//! A `data:` URI (base64 PNG, JPEG or WebP) is decoded here, in the frontend, so a corrupt,
//! oversized, unsupported or surplus image is a 400 naming the problem before any worker
//! sees the request. http(s) URLs are refused with a message saying so: the server fetches
//! nothing on a client's behalf (fetching, with size and time limits behind a switch that is
//! off by default, is the encoder's job once it lands).

use crate::protocol::ChatImage;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use turbine_kernels::vision::{self, DecodeLimits};

/// Limits on the images of one request (`http.images` in the cluster file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageLimits {
    /// Images in one request, across all messages.
    pub max_images_per_request: usize,
    /// Encoded bytes of one image (after base64 decoding).
    pub max_image_bytes: usize,
    /// Largest width or height in pixels.
    pub max_side: u32,
    /// Largest width × height.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        let d = DecodeLimits::default();
        ImageLimits {
            max_images_per_request: 8,
            max_image_bytes: 4 << 20,
            max_side: d.max_side,
            max_pixels: d.max_pixels,
        }
    }
}

impl ImageLimits {
    fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.max_side,
            max_pixels: self.max_pixels,
        }
    }
}

/// Media types a `data:` URI may declare (the bytes are sniffed all the same).
const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/jpg", "image/webp"];

/// Decodes the image an `image_url` part names; the error is the client's message.
pub fn image_from_url(url: &str, limits: &ImageLimits) -> Result<ChatImage, String> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https:/") {
        return Err("image URLs over http(s) are not fetched by this server; \
                    send the image inline as a data: URI (data:image/png;base64,...)"
            .to_string());
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err("`url` must be a data: URI (data:image/png;base64,...)".to_string());
    };
    let Some((header, payload)) = rest.split_once(',') else {
        return Err("the data: URI has no `,` before its data".to_string());
    };
    let mut fields = header.split(';');
    let media = fields.next().unwrap_or("").trim().to_ascii_lowercase();
    if !media.is_empty() && !IMAGE_TYPES.contains(&media.as_str()) {
        return Err(format!(
            "media type `{media}` is not supported (send image/png, image/jpeg or image/webp)"
        ));
    }
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err("the data: URI must be base64 (data:image/png;base64,...)".to_string());
    }
    // base64 is 4 characters per 3 bytes: refuse before decoding what cannot fit.
    let max_chars = limits.max_image_bytes.div_ceil(3).saturating_mul(4) + 4;
    if payload.len() > max_chars {
        return Err(format!(
            "image is over the limit of {} bytes",
            limits.max_image_bytes
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim_end())
        .map_err(|e| format!("the data: URI's base64 is invalid: {e}"))?;
    if bytes.len() > limits.max_image_bytes {
        return Err(format!(
            "image is {} bytes, over the limit of {} bytes",
            bytes.len(),
            limits.max_image_bytes
        ));
    }
    let image = vision::decode(&bytes, &limits.decode_limits()).map_err(|e| e.to_string())?;
    Ok(ChatImage::new(image, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2x1 PNG (red, green).
    const PNG_2X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAABCAIAAAB7QOjdAAAAD0lEQVR4nGP4z8DA8J8BAAf/Af8Bf4mnAAAAAElFTkSuQmCC";

    #[test]
    fn decodes_a_data_uri_and_hashes_its_pixels() {
        let url = format!("data:image/png;base64,{PNG_2X1}");
        let img = image_from_url(&url, &ImageLimits::default()).unwrap();
        assert_eq!((img.image.width, img.image.height), (2, 1));
        assert_eq!(img.image.pixel(0, 0), Some([255, 0, 0]));
        let again = image_from_url(&url, &ImageLimits::default()).unwrap();
        assert_eq!(img.hash, again.hash);
    }

    #[test]
    fn refusals_say_why() {
        let l = ImageLimits::default();
        let err = |url: &str| image_from_url(url, &l).unwrap_err();
        assert!(err("https://example.invalid/cat.png").contains("not fetched"));
        assert!(err("file:///etc/passwd").contains("data: URI"));
        assert!(err("data:image/png;base64").contains("no `,`"));
        assert!(err("data:text/plain;base64,aGk=").contains("text/plain"));
        assert!(err("data:image/png,rawbytes").contains("must be base64"));
        assert!(err("data:image/png;base64,!!!").contains("base64 is invalid"));
        assert!(err("data:image/png;base64,aGVsbG8gd29ybGQ=").contains("not a recognised image"));
        let tiny = ImageLimits {
            max_image_bytes: 10,
            ..ImageLimits::default()
        };
        let url = format!("data:image/png;base64,{PNG_2X1}");
        assert!(image_from_url(&url, &tiny)
            .unwrap_err()
            .contains("limit of 10 bytes"));
        let narrow = ImageLimits {
            max_side: 1,
            ..ImageLimits::default()
        };
        assert!(image_from_url(&url, &narrow).unwrap_err().contains("2x1"));
    }
}
