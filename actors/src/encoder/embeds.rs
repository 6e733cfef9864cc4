//! A prompt's image embeddings, placed: each image's rows go, in order, to its placeholder
//! tokens (Idefics3 puts a tile's `<image>` tokens between text tokens such as
//! `<row_1_col_2>`, so one image is several runs). A step feeds a window of the prompt
//! (`start_pos..start_pos + len`: a chunk, a recompute after preemption, the rest after a
//! prefix-cache hit); [`PromptEmbeds::splices`] cuts the runs to that window.

use crate::ids::TokenId;
use crate::protocol::PromptImage;

/// The embeddings of every placeholder token of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptEmbeds {
    hidden: usize,
    /// Runs of placeholder positions: (first position, rows, first row in `data`).
    runs: Vec<(usize, usize, usize)>,
    /// `[rows, hidden]`, row-major, images in prompt order.
    data: Vec<f32>,
}

/// One run cut to a step's window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepSplice<'a> {
    /// Index in the step's tokens of the first replaced token.
    pub offset: usize,
    pub rows: usize,
    pub embeds: &'a [f32],
}

impl PromptEmbeds {
    /// Places `per_image[i]` (`[images[i].tokens, hidden]`) over image `i`'s placeholders:
    /// the first `tokens` positions holding `placeholder` from `images[i].first_token` on.
    /// Refuses a layout that does not add up (too few placeholders, rows of the wrong size,
    /// images out of order or overlapping).
    pub fn place(
        prompt: &[TokenId],
        placeholder: TokenId,
        images: &[PromptImage],
        per_image: Vec<Vec<f32>>,
        hidden: usize,
    ) -> Result<PromptEmbeds, String> {
        if images.len() != per_image.len() {
            return Err(format!(
                "{} images but {} embeddings",
                images.len(),
                per_image.len()
            ));
        }
        let mut runs = Vec::new();
        let mut data = Vec::new();
        let mut pos = 0usize;
        for (i, (img, rows)) in images.iter().zip(per_image).enumerate() {
            let want = img.tokens as usize;
            if rows.len() != want * hidden {
                return Err(format!(
                    "image {i}: {} values of embeddings for {want} tokens of width {hidden}",
                    rows.len()
                ));
            }
            let first = img.first_token as usize;
            if first < pos {
                return Err(format!("image {i} starts inside the image before it"));
            }
            pos = first;
            let mut placed = 0usize;
            while placed < want {
                while pos < prompt.len() && prompt[pos] != placeholder {
                    pos += 1;
                }
                let start = pos;
                while pos < prompt.len() && prompt[pos] == placeholder && placed < want {
                    pos += 1;
                    placed += 1;
                }
                if pos == start {
                    return Err(format!(
                        "image {i}: the prompt has {placed} of its {want} placeholder tokens"
                    ));
                }
                runs.push((
                    start,
                    pos - start,
                    data.len() / hidden + placed - (pos - start),
                ));
            }
            data.extend(rows);
        }
        Ok(PromptEmbeds { hidden, runs, data })
    }

    /// Placeholder positions covered.
    pub fn rows(&self) -> usize {
        self.data.len() / self.hidden.max(1)
    }

    /// The splices of a step that feeds positions `start..start + len`.
    pub fn splices(&self, start: usize, len: usize) -> Vec<StepSplice<'_>> {
        let end = start + len;
        let h = self.hidden;
        self.runs
            .iter()
            .filter_map(|&(first, rows, row0)| {
                let lo = first.max(start);
                let hi = (first + rows).min(end);
                (lo < hi).then(|| {
                    let from = row0 + (lo - first);
                    StepSplice {
                        offset: lo - start,
                        rows: hi - lo,
                        embeds: &self.data[from * h..(from + hi - lo) * h],
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ImageHash;
    use std::sync::Arc;

    fn image(first: u32, tokens: u32) -> PromptImage {
        PromptImage {
            hash: ImageHash(first as u64),
            first_token: first,
            tokens,
            encoded: Arc::new(Vec::new()),
            decoded: None,
            embeds: None,
        }
    }

    #[test]
    fn runs_follow_placeholders_and_windows_cut_them() {
        // 9 = placeholder. Image 0: positions 1, 2, 4; image 1: 6, 7.
        let prompt = [0, 9, 9, 5, 9, 5, 9, 9, 5];
        let e = PromptEmbeds::place(
            &prompt,
            9,
            &[image(1, 3), image(6, 2)],
            vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0]],
            1,
        )
        .unwrap();
        assert_eq!(e.rows(), 5);
        let all: Vec<_> = e
            .splices(0, 9)
            .iter()
            .map(|s| (s.offset, s.embeds.to_vec()))
            .collect();
        assert_eq!(
            all,
            vec![(1, vec![1.0, 2.0]), (4, vec![3.0]), (6, vec![4.0, 5.0])]
        );
        // A chunk 2..7: the second half of the first run, the middle one, one row of the last.
        let part: Vec<_> = e
            .splices(2, 5)
            .iter()
            .map(|s| (s.offset, s.rows, s.embeds.to_vec()))
            .collect();
        assert_eq!(
            part,
            vec![(0, 1, vec![2.0]), (2, 1, vec![3.0]), (4, 1, vec![4.0])]
        );
        assert!(e.splices(8, 1).is_empty());
    }

    #[test]
    fn layouts_that_do_not_add_up_are_refused() {
        let prompt = [0, 9, 9, 5];
        let err = PromptEmbeds::place(&prompt, 9, &[image(1, 3)], vec![vec![0.0; 3]], 1);
        assert!(err.unwrap_err().contains("2 of its 3"));
        let err = PromptEmbeds::place(&prompt, 9, &[image(1, 2)], vec![vec![0.0; 3]], 1);
        assert!(err.unwrap_err().contains("3 values"));
    }
}
