//! Images in chat requests: `{"type": "image_url", "image_url": {"url": ...}}` content parts.
//!
//! A `data:` URI (base64 PNG, JPEG or WebP) is decoded here, in the frontend, so a corrupt,
//! oversized, unsupported or surplus image is a 400 naming the problem before any worker
//! sees the request. An http(s) URL is checked here (the switch, the scheme, the host
//! allowlist) and fetched by `fetch.rs` with size and time limits before the prompt is
//! made; its bytes are then decoded here like a data: URI's. As in vLLM, remote URLs are
//! allowed by default (`http.images.remote_urls`); a public deployment restricts them to
//! its hosts (`allowed_hosts`) or switches them off.

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
    /// Encoded bytes of one image (after base64 decoding; as downloaded for a URL).
    pub max_image_bytes: usize,
    /// Largest width or height in pixels.
    pub max_side: u32,
    /// Largest width × height.
    pub max_pixels: u64,
    /// Fetch images named by http(s) URLs (false: such parts are a 400).
    pub remote_urls: bool,
    /// The most one image's fetch may take, connection to last byte (redirects included).
    pub fetch_timeout_ms: u64,
    /// Redirects followed per image (0: a redirect is a 400).
    pub max_redirects: u32,
    /// Hosts remote images may come from (exact names, or `.example.com` for its
    /// subdomains); empty: any host.
    pub allowed_hosts: Vec<String>,
}

impl Default for ImageLimits {
    fn default() -> Self {
        let d = DecodeLimits::default();
        ImageLimits {
            max_images_per_request: 8,
            max_image_bytes: 4 << 20,
            max_side: d.max_side,
            max_pixels: d.max_pixels,
            remote_urls: true,
            fetch_timeout_ms: 5_000,
            max_redirects: 3,
            allowed_hosts: Vec::new(),
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

    /// Whether remote images may come from `host`.
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allowed_hosts.is_empty()
            || self.allowed_hosts.iter().any(|a| {
                let a = a.to_ascii_lowercase();
                match a.strip_prefix('.') {
                    Some(domain) => host == domain || host.ends_with(&format!(".{domain}")),
                    None => host == a,
                }
            })
    }
}

/// Where an `image_url` part's image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Inline (a data: URI), decoded.
    Inline(ChatImage),
    /// An http(s) URL that passed the checks; to be fetched (`fetch.rs`).
    Remote(String),
}

/// Media types a `data:` URI may declare (the bytes are sniffed all the same).
const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/jpg", "image/webp"];

/// The image an `image_url` part names; the error is the client's message.
pub fn image_from_url(url: &str, limits: &ImageLimits) -> Result<ImageSource, String> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https:/") {
        if !limits.remote_urls {
            return Err("image URLs over http(s) are not fetched by this server \
                        (http.images.remote_urls is off); send the image inline as a data: \
                        URI (data:image/png;base64,...)"
                .to_string());
        }
        super::fetch::check_url(url, limits)?;
        return Ok(ImageSource::Remote(url.to_string()));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(
            "`url` must be a data: URI (data:image/png;base64,...) or an http(s) URL".to_string(),
        );
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
    image_from_bytes(bytes, limits).map(ImageSource::Inline)
}

/// Decodes an image's encoded bytes (inline or fetched) within `limits`.
pub fn image_from_bytes(bytes: Vec<u8>, limits: &ImageLimits) -> Result<ChatImage, String> {
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

    fn inline(url: &str, limits: &ImageLimits) -> Result<ChatImage, String> {
        match image_from_url(url, limits)? {
            ImageSource::Inline(img) => Ok(img),
            ImageSource::Remote(url) => Err(format!("remote: {url}")),
        }
    }

    #[test]
    fn decodes_a_data_uri_and_hashes_its_pixels() {
        let url = format!("data:image/png;base64,{PNG_2X1}");
        let img = inline(&url, &ImageLimits::default()).unwrap();
        assert_eq!((img.image.width, img.image.height), (2, 1));
        assert_eq!(img.image.pixel(0, 0), Some([255, 0, 0]));
        let again = inline(&url, &ImageLimits::default()).unwrap();
        assert_eq!(img.hash, again.hash);
    }

    #[test]
    fn refusals_say_why() {
        let l = ImageLimits::default();
        let err = |url: &str| inline(url, &l).unwrap_err();
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
        assert!(inline(&url, &tiny)
            .unwrap_err()
            .contains("limit of 10 bytes"));
        let narrow = ImageLimits {
            max_side: 1,
            ..ImageLimits::default()
        };
        assert!(inline(&url, &narrow).unwrap_err().contains("2x1"));
    }

    #[test]
    fn remote_urls_are_checked_then_left_to_fetch() {
        let l = ImageLimits::default();
        assert_eq!(
            image_from_url("https://example.com/cat.png", &l),
            Ok(ImageSource::Remote("https://example.com/cat.png".into()))
        );
        let off = ImageLimits {
            remote_urls: false,
            ..ImageLimits::default()
        };
        let why = image_from_url("https://example.com/cat.png", &off).unwrap_err();
        assert!(why.contains("remote_urls is off"), "{why}");
        let only = ImageLimits {
            allowed_hosts: vec!["images.example.com".into(), ".cdn.example.org".into()],
            ..ImageLimits::default()
        };
        assert!(image_from_url("http://images.example.com/a.png", &only).is_ok());
        assert!(image_from_url("http://x.cdn.example.org/a.png", &only).is_ok());
        assert!(image_from_url("http://cdn.example.org/a.png", &only).is_ok());
        let why = image_from_url("http://evil.example.net/a.png", &only).unwrap_err();
        assert!(why.contains("allowed_hosts"), "{why}");
        assert!(!only.host_allowed("xcdn.example.org"));
        let why = image_from_url("http://", &l).unwrap_err();
        assert!(why.contains("not a valid URL"), "{why}");
    }
}
