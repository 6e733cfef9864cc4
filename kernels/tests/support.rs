//! Helpers shared by this crate's integration tests (one binary: see integration.rs).

use turbine_kernels::backend::Splice;

/// One splice per run of `image_token` in `prompt` (a single-step batch), each taking the
/// next rows of `embeds` (`hidden` values a row); also how many rows the runs took, which a
/// caller checks against the embeddings it has.
pub fn image_splices<'a>(
    prompt: &[u32],
    image_token: u32,
    embeds: &'a [f32],
    hidden: usize,
) -> (Vec<Splice<'a>>, usize) {
    let (mut splices, mut used, mut i) = (Vec::new(), 0, 0);
    while i < prompt.len() {
        if prompt[i] != image_token {
            i += 1;
            continue;
        }
        let start = i;
        while i < prompt.len() && prompt[i] == image_token {
            i += 1;
        }
        let rows = i - start;
        let values = embeds
            .get(used * hidden..(used + rows) * hidden)
            .unwrap_or(&[]);
        splices.push(Splice {
            step: 0,
            offset: start,
            rows,
            embeds: values,
        });
        used += rows;
    }
    (splices, used)
}

/// Whether a CUDA device is there to test on; prints why not (the tests then skip).
#[cfg(feature = "cuda")]
pub fn cuda_device_present() -> bool {
    match turbine_kernels::cuda::device_count() {
        Ok(n) if n > 0 => true,
        Ok(_) => {
            eprintln!("SKIP: no CUDA device present");
            false
        }
        Err(e) => {
            eprintln!("SKIP: {e}");
            false
        }
    }
}
