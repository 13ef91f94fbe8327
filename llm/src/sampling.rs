//! Turning logits into tokens, with reusable buffers (no allocation per token).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::chat::Sampling;

/// Index of the largest logit (the first one on ties, like llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Softmax of `logits` into `out` (full vocabulary).
pub fn softmax_into(logits: &[f32], temperature: f32, out: &mut Vec<f32>) {
    out.clear();
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let t = temperature.max(1e-6);
    let mut sum = 0.0;
    out.extend(logits.iter().map(|&v| {
        let e = ((v - max) / t).exp();
        sum += e;
        e
    }));
    let inv = 1.0 / sum;
    for p in out.iter_mut() {
        *p *= inv;
    }
}

/// A sampler: its settings, its random state and its buffers.
#[derive(Debug)]
pub struct Sampler {
    pub sampling: Sampling,
    rng: StdRng,
    idx: Vec<u32>,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let seed = match sampling {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            sampling,
            rng: StdRng::seed_from_u64(seed),
            idx: Vec::new(),
        }
    }

    pub fn is_greedy(&self) -> bool {
        matches!(self.sampling, Sampling::Greedy)
            || matches!(self.sampling, Sampling::Sample { temperature, .. } if temperature <= 0.0)
    }

    /// The distribution sampling draws from (temperature, top-k, top-p applied), into `out`.
    pub fn distribution(&mut self, logits: &[f32], out: &mut Vec<f32>) {
        let (temperature, top_k, top_p) = match self.sampling {
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } if temperature > 0.0 => (temperature, top_k, top_p),
            _ => {
                // Greedy as a distribution: all mass on the argmax.
                out.clear();
                out.resize(logits.len(), 0.0);
                out[argmax(logits) as usize] = 1.0;
                return;
            }
        };
        softmax_into(logits, temperature, out);
        let k = if top_k == 0 {
            out.len()
        } else {
            top_k.min(out.len())
        };
        if k == out.len() && top_p >= 1.0 {
            return;
        }
        self.idx.clear();
        self.idx.extend(0..out.len() as u32);
        let probs = &*out;
        let by_prob_desc = |a: &u32, b: &u32| probs[*b as usize].total_cmp(&probs[*a as usize]);
        if k < self.idx.len() {
            self.idx.select_nth_unstable_by(k - 1, by_prob_desc);
        }
        let kept = &mut self.idx[..k];
        kept.sort_unstable_by(by_prob_desc);
        let mut cum = 0.0;
        let mut n = 0;
        for &i in kept.iter() {
            cum += probs[i as usize];
            n += 1;
            if cum >= top_p {
                break;
            }
        }
        // Zero everything, then put back the kept tokens renormalised.
        let inv = 1.0 / cum;
        // Mark the kept tokens by negating them, so one pass zeroes the rest without a copy.
        for &i in &self.idx[..n] {
            out[i as usize] = -out[i as usize];
        }
        for p in out.iter_mut() {
            *p = if *p < 0.0 { -*p * inv } else { 0.0 };
        }
    }

    /// Draws an index from a distribution that sums to 1.
    pub fn draw(&mut self, probs: &[f32]) -> u32 {
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                cum += p;
                last_nonzero = i;
                if r < cum {
                    return i as u32;
                }
            }
        }
        last_nonzero as u32
    }

    /// A uniform number in [0, 1), for rejection-sampling acceptance.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random()
    }

    /// The next token from `logits`, using `buf` as working space.
    pub fn sample(&mut self, logits: &[f32], buf: &mut Vec<f32>) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        self.distribution(logits, buf);
        self.draw(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        let logits = [0.0, 3.0, 1.0, 2.0, -1.0];
        let mut s = Sampler::new(Sampling::Sample {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 1,
        });
        let mut d = Vec::new();
        s.distribution(&logits, &mut d);
        assert_eq!(d.iter().filter(|&&p| p > 0.0).count(), 2);
        assert!(d[1] > d[3] && d[3] > 0.0);
        assert!((d.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        for _ in 0..50 {
            let t = s.draw(&d);
            assert!(t == 1 || t == 3);
        }
        let mut s = Sampler::new(Sampling::Sample {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
        });
        s.distribution(&logits, &mut d);
        // softmax(3) alone is about 0.64 >= 0.5: only token 1 survives.
        assert_eq!(d[1], 1.0);
        assert_eq!(argmax(&logits), 1);
    }
}
