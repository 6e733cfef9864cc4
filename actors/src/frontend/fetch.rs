//! Images named by http(s) URLs, fetched by the frontend before the prompt is made.
//!
//! The frontend needs an image's pixels anyway: its size lays out the prompt's placeholder
//! tokens and its content hash salts the KV block hashes (and keys the encoders' cache), so
//! the image is fetched here once, then travels like an inline one. Every fetch is bounded
//! (`http.images`): one deadline for connection, redirects and body (`fetch_timeout_ms`), the
//! body cut at `max_image_bytes` (refused up front when `Content-Length` says so), at most
//! `max_redirects` redirects, each hop's host checked against `allowed_hosts`. Every failure
//! is the client's 400 naming the part and what went wrong; the server keeps serving.
//!
//! The client is hyper's (already compiled for kube), with rustls and the machine's root
//! certificates for https (loaded on the first https URL).

use super::images::{image_from_bytes, ImageLimits};
use super::validate::Validated;
use super::ApiError;
use crate::protocol::{MessagePart, Prompt, RemoteImage};
use bytes::Bytes;
use http::uri::Scheme;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::OnceLock;
use std::time::Duration;

/// Checks an http(s) image URL before anything is fetched: it parses, names a host, and
/// the host is allowed. Returns it parsed.
pub fn check_url(url: &str, limits: &ImageLimits) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a valid URL ({e})"))?;
    let scheme = uri.scheme();
    if scheme != Some(&Scheme::HTTP) && scheme != Some(&Scheme::HTTPS) {
        return Err(format!(
            "`{url}`: only http and https image URLs are fetched"
        ));
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("`{url}` is not a valid URL (it names no host)"))?;
    if !limits.host_allowed(host) {
        return Err(format!(
            "images from `{host}` are not accepted here (http.images.allowed_hosts)"
        ));
    }
    Ok(uri)
}

/// Where a redirect's `Location` points, from `base`.
fn resolve(base: &Uri, location: &str) -> Result<String, String> {
    if location.parse::<Uri>().is_ok_and(|u| u.scheme().is_some()) {
        return Ok(location.to_string());
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    Ok(if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{scheme}://{authority}{dir}{location}")
    })
}

/// An error and its sources on one line (hyper's top-level messages are terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Fetches remote images within [`ImageLimits`]. One per frontend; cheap to share.
pub struct ImageFetcher {
    limits: ImageLimits,
    http: Client<HttpConnector, Empty<Bytes>>,
    /// Built on the first https URL (it reads the machine's root certificates); the error
    /// says why https URLs cannot be fetched.
    https: OnceLock<Result<HttpsClient, String>>,
}

impl ImageFetcher {
    pub fn new(limits: ImageLimits) -> ImageFetcher {
        ImageFetcher {
            limits,
            http: Client::builder(TokioExecutor::new()).build_http(),
            https: OnceLock::new(),
        }
    }

    fn https(&self) -> Result<&HttpsClient, String> {
        self.https
            .get_or_init(|| {
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_native_roots()
                    .map_err(|e| {
                        format!("https image URLs cannot be fetched on this server ({e})")
                    })?
                    .https_or_http()
                    .enable_http1()
                    .build();
                Ok(Client::builder(TokioExecutor::new()).build(connector))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The encoded bytes of the image at `url`, within the limits.
    pub async fn fetch_bytes(&self, url: &str) -> Result<Vec<u8>, String> {
        let ms = self.limits.fetch_timeout_ms;
        tokio::time::timeout(Duration::from_millis(ms), self.follow(url))
            .await
            .map_err(|_| {
                format!("fetching `{url}` took over {ms} ms (http.images.fetch_timeout_ms)")
            })?
    }

    async fn follow(&self, url: &str) -> Result<Vec<u8>, String> {
        let max = self.limits.max_image_bytes;
        let mut uri = check_url(url, &self.limits)?;
        let mut redirects = 0;
        loop {
            let request = Request::get(uri.clone())
                .header(header::USER_AGENT, "turbine")
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("`{uri}`: {e}"))?;
            let answer = if uri.scheme() == Some(&Scheme::HTTPS) {
                self.https()
                    .map_err(|e| format!("`{uri}`: {e}"))?
                    .request(request)
                    .await
            } else {
                self.http.request(request).await
            };
            let response = answer.map_err(|e| format!("fetching `{uri}` failed: {}", chain(&e)))?;
            let status = response.status();
            if status.is_redirection() {
                let Some(location) = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                else {
                    return Err(format!("`{uri}` answered {status} without a Location"));
                };
                if redirects >= self.limits.max_redirects {
                    return Err(format!(
                        "`{url}` redirects more than {} times (http.images.max_redirects)",
                        self.limits.max_redirects
                    ));
                }
                redirects += 1;
                uri = check_url(&resolve(&uri, location)?, &self.limits)?;
                continue;
            }
            if !status.is_success() {
                return Err(format!("fetching `{uri}`: the server answered {status}"));
            }
            let declared = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let over = format!("the image at `{uri}` is over the limit of {max} bytes");
            if let Some(n) = declared.filter(|&n| n > max as u64) {
                return Err(format!("{over} ({n} bytes)"));
            }
            let mut body = response.into_body();
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("reading `{uri}` failed: {}", chain(&e)))?;
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > max {
                        return Err(over);
                    }
                    out.extend_from_slice(&data);
                }
            }
            return Ok(out);
        }
    }

    /// Fetches and decodes one remote image.
    async fn image(&self, remote: &RemoteImage) -> Result<crate::protocol::ChatImage, ApiError> {
        let fail = |why: String| ApiError::field(&remote.param, why);
        let bytes = self.fetch_bytes(&remote.url).await.map_err(fail)?;
        let limits = self.limits.clone();
        tokio::task::spawn_blocking(move || image_from_bytes(bytes, &limits))
            .await
            .map_err(|e| fail(format!("decoding the image failed: {e}")))?
            .map_err(fail)
    }

    /// Replaces every remote image of `req`'s prompts by the image fetched from it (all at
    /// once). The first failure is the request's 400.
    pub async fn fetch_request(&self, req: &mut Validated) -> Result<(), ApiError> {
        let remote: Vec<RemoteImage> = req
            .prompts
            .iter()
            .filter_map(|p| match p {
                Prompt::Chat(messages) => Some(messages),
                _ => None,
            })
            .flatten()
            .flat_map(|m| m.remote_images().cloned())
            .collect();
        if remote.is_empty() {
            return Ok(());
        }
        let fetched = futures::future::join_all(remote.iter().map(|r| self.image(r))).await;
        let mut fetched = fetched
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        for prompt in &mut req.prompts {
            let Prompt::Chat(messages) = prompt else {
                continue;
            };
            for part in messages.iter_mut().flat_map(|m| m.parts.iter_mut()) {
                if matches!(part, MessagePart::Remote(_)) {
                    if let Some(image) = fetched.next() {
                        *part = MessagePart::Image(image);
                    }
                }
            }
        }
        if let (Prompt::Chat(_), Some(first)) = (&req.request.prompt, req.prompts.first()) {
            req.request.prompt = first.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_url_they_came_from() {
        let base: Uri = "http://h:8/img/a.png?x=1".parse().unwrap();
        let r = |l: &str| resolve(&base, l).unwrap();
        assert_eq!(r("https://o/b.png"), "https://o/b.png");
        assert_eq!(r("//o:9/b.png"), "http://o:9/b.png");
        assert_eq!(r("/b.png"), "http://h:8/b.png");
        assert_eq!(r("b.png"), "http://h:8/img/b.png");
    }
}
