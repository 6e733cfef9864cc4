//! The Idefics3 / SmolVLM image processor: an image becomes square tiles of normalised
//! pixels (a grid of crops plus a downscaled global view) and the prompt text that stands
//! for it (`<fake_token_around_image><row_r_col_c><image>...`), as transformers'
//! `Idefics3ImageProcessor` + `Idefics3Processor` make them.
//!
//! Steps (processor_config.json): resize so the longest edge is `size.longest_edge`
//! (the other edge kept in ratio, rounded to even); with splitting, resize up to whole tiles
//! of `max_image_size.longest_edge`, cut the tiles row by row, and add the whole image
//! resized to one tile; without, resize to one tile. Then `x * rescale_factor`, then
//! `(x - mean) / std` per channel.

use super::decode::RgbImage;
use super::resize::{crop, resize, Filter};
use serde_json::Value;

/// What the processor does, from processor_config.json (or preprocessor_config.json).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessorConfig {
    pub longest_edge: u32,
    /// Tile side in pixels (the vision tower's `image_size`).
    pub tile: u32,
    pub splitting: bool,
    pub filter: Filter,
    pub rescale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Image tokens per tile.
    pub image_seq_len: usize,
}

/// transformers' cap on the resized image's longest edge.
const MAX_IMAGE_SIZE: u32 = 4096;

impl ProcessorConfig {
    /// Reads `processor_config.json`'s object: `{"image_processor": {...}, "image_seq_len"}`
    /// (transformers 5), or a flat `preprocessor_config.json` plus `image_seq_len` found
    /// elsewhere (`fallback_seq_len`).
    pub fn from_hf(v: &Value, fallback_seq_len: Option<usize>) -> Result<ProcessorConfig, String> {
        let ip = v.get("image_processor").unwrap_or(v);
        let edge = |o: Option<&Value>| {
            o.and_then(|s| s.get("longest_edge"))
                .and_then(Value::as_u64)
        };
        let triple = |k: &str, d: f32| -> Result<[f32; 3], String> {
            match ip.get(k) {
                None => Ok([d; 3]),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let f = |i: usize| a[i].as_f64().map(|x| x as f32).ok_or(format!("{k}[{i}]"));
                    Ok([f(0)?, f(1)?, f(2)?])
                }
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(d as f64) as f32; 3]),
                Some(other) => Err(format!("{k} is {other}, expected 3 numbers")),
            }
        };
        let flag = |k: &str| ip.get(k).and_then(Value::as_bool).unwrap_or(true);
        if !flag("do_resize") || !flag("do_rescale") || !flag("do_normalize") {
            return Err("do_resize, do_rescale and do_normalize off are not supported".into());
        }
        let resample = ip.get("resample").and_then(Value::as_u64).unwrap_or(1);
        let cfg = ProcessorConfig {
            longest_edge: edge(ip.get("size")).unwrap_or(4 * 364) as u32,
            tile: edge(ip.get("max_image_size")).unwrap_or(364) as u32,
            splitting: flag("do_image_splitting"),
            filter: Filter::from_pil(resample)
                .ok_or_else(|| format!("resample {resample} is not supported (1, 2, 3 are)"))?,
            rescale: ip
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0) as f32,
            mean: triple("image_mean", 0.5)?,
            std: triple("image_std", 0.5)?,
            image_seq_len: v
                .get("image_seq_len")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .or(fallback_seq_len)
                .ok_or("image_seq_len missing")?,
        };
        if cfg.tile == 0 || cfg.longest_edge == 0 || cfg.std.contains(&0.0) {
            return Err("tile size, longest edge and std must be positive".into());
        }
        Ok(cfg)
    }
}

/// One image, processed.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessedImage {
    /// Each `[3, tile, tile]`, normalised; the grid's tiles row by row, then the global view.
    pub tiles: Vec<Vec<f32>>,
    /// The grid (0 x 0 when the image was not split: one tile only).
    pub rows: usize,
    pub cols: usize,
}

impl ProcessedImage {
    /// The prompt text that stands for this image (its `<image>` tokens are where the
    /// embeddings go, `image_seq_len` per tile, in tile order).
    pub fn prompt_text(&self, image_seq_len: usize) -> String {
        grid_text(self.rows, self.cols, image_seq_len)
    }
}

/// `<fake_token_around_image><row_r_col_c><image>...` for a grid (or the global view alone).
fn grid_text(rows: usize, cols: usize, image_seq_len: usize) -> String {
    let image = "<image>".repeat(image_seq_len);
    let global = format!("<fake_token_around_image><global-img>{image}<fake_token_around_image>");
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut s = String::new();
    for r in 0..rows {
        for c in 0..cols {
            s.push_str(&format!(
                "<fake_token_around_image><row_{}_col_{}>{image}",
                r + 1,
                c + 1
            ));
        }
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&global);
    s
}

/// The tile grid an image of `width x height` gets, without touching its pixels: what the
/// prompt text needs (a frontend computes it; only the worker or encoder runs [`process`]).
/// The same steps as [`process`], on sizes only.
pub fn layout(width: u32, height: u32, cfg: &ProcessorConfig) -> ProcessedLayout {
    let one = ProcessedLayout { rows: 0, cols: 0 };
    if !cfg.splitting {
        return one;
    }
    let (w, h) = fit_longest(width, height, cfg.longest_edge);
    let t = cfg.tile;
    let (w, h) = whole_tiles(w, h, t);
    if w <= t && h <= t {
        return one;
    }
    ProcessedLayout {
        rows: ((h - t) / t + 1) as usize,
        cols: ((w - t) / t + 1) as usize,
    }
}

/// An image's tile grid (0 x 0: one tile, no split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessedLayout {
    pub rows: usize,
    pub cols: usize,
}

impl ProcessedLayout {
    /// Tiles the tower encodes: the grid plus the global view, or the one tile.
    pub fn tiles(&self) -> usize {
        if self.rows == 0 && self.cols == 0 {
            1
        } else {
            self.rows * self.cols + 1
        }
    }

    /// The prompt text that stands for the image (see [`ProcessedImage::prompt_text`]).
    pub fn prompt_text(&self, image_seq_len: usize) -> String {
        grid_text(self.rows, self.cols, image_seq_len)
    }
}

/// transformers' "longest edge to `max_len`, the other in ratio, rounded up to even".
fn fit_longest(w: u32, h: u32, max_len: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    let (mut w, mut h) = (w, h);
    if w >= h {
        w = max_len;
        h = (w as f64 / aspect) as u32;
        h += h % 2;
    } else {
        h = max_len;
        w = (h as f64 * aspect) as u32;
        w += w % 2;
    }
    let (mut w, mut h) = (w.max(1), h.max(1));
    // Then below transformers' upper bound, in ratio.
    let aspect = w as f64 / h as f64;
    if w >= h && w > MAX_IMAGE_SIZE {
        w = MAX_IMAGE_SIZE;
        h = (w as f64 / aspect) as u32;
    } else if h > w && h > MAX_IMAGE_SIZE {
        h = MAX_IMAGE_SIZE;
        w = (h as f64 * aspect) as u32;
    }
    (w.max(1), h.max(1))
}

/// Up to whole tiles, the way transformers rounds (the second edge from the first's ratio).
fn whole_tiles(w: u32, h: u32, tile: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    let up = |x: u32| x.div_ceil(tile) * tile;
    if w >= h {
        let nw = up(w);
        (nw, up(((nw as f64) / aspect) as u32))
    } else {
        let nh = up(h);
        (up(((nh as f64) * aspect) as u32), nh)
    }
}

fn normalise(img: &RgbImage, cfg: &ProcessorConfig) -> Vec<f32> {
    let plane = (img.width * img.height) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in img.pixels.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            let x = px[ch] as f32 * cfg.rescale;
            out[ch * plane + i] = (x - cfg.mean[ch]) / cfg.std[ch];
        }
    }
    out
}

/// Processes one decoded image.
pub fn process(img: &RgbImage, cfg: &ProcessorConfig) -> ProcessedImage {
    let (w, h) = fit_longest(img.width, img.height, cfg.longest_edge);
    let img = resize(img, w, h, cfg.filter);
    let t = cfg.tile;
    if !cfg.splitting {
        let one = resize(&img, t, t, cfg.filter);
        return ProcessedImage {
            tiles: vec![normalise(&one, cfg)],
            rows: 0,
            cols: 0,
        };
    }
    let (w, h) = whole_tiles(img.width, img.height, t);
    let img = resize(&img, w, h, cfg.filter);
    if img.width <= t && img.height <= t {
        return ProcessedImage {
            tiles: vec![normalise(&img, cfg)],
            rows: 0,
            cols: 0,
        };
    }
    let (rows, cols) = ((img.height - t) / t + 1, (img.width - t) / t + 1);
    let mut tiles = Vec::with_capacity((rows * cols + 1) as usize);
    for r in 0..rows {
        for c in 0..cols {
            tiles.push(normalise(&crop(&img, c * t, r * t, t, t), cfg));
        }
    }
    tiles.push(normalise(&resize(&img, t, t, cfg.filter), cfg));
    ProcessedImage {
        tiles,
        rows: rows as usize,
        cols: cols as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(splitting: bool) -> ProcessorConfig {
        ProcessorConfig {
            longest_edge: 64,
            tile: 32,
            splitting,
            filter: Filter::from_pil(1).unwrap(),
            rescale: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
            image_seq_len: 4,
        }
    }

    #[test]
    fn layout_is_the_grid_process_makes() {
        for splitting in [true, false] {
            let c = cfg(splitting);
            for (w, h) in [
                (56, 40),
                (24, 20),
                (1, 1),
                (200, 30),
                (30, 200),
                (64, 64),
                (33, 31),
            ] {
                let img = RgbImage {
                    width: w,
                    height: h,
                    pixels: vec![128; (3 * w * h) as usize],
                };
                let p = process(&img, &c);
                let l = layout(w, h, &c);
                assert_eq!((l.rows, l.cols), (p.rows, p.cols), "{w}x{h}");
                assert_eq!(l.tiles(), p.tiles.len(), "{w}x{h}");
                assert_eq!(l.prompt_text(4), p.prompt_text(4));
            }
        }
    }
}
