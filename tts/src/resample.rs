//! The voice's rate (22,050 Hz for most Piper voices) to what the transport needs: 48 kHz
//! (WebRTC/Opus), 16 kHz (WebSocket, ASR), 8 kHz (G.711). rubato's synchronous FFT resampler,
//! fed as audio arrives so a stream's chunks are resampled without seams.

use rubato::{FftFixedIn, Resampler as _};

use crate::error::{Result, TtsError};

/// Input frames per FFT block: about 46 ms at 22,050 Hz, small enough not to delay the first
/// audio noticeably.
const CHUNK_IN: usize = 1024;

/// A mono resampler that keeps its state across [`Self::push`] calls.
pub struct StreamResampler {
    from: u32,
    to: u32,
    /// `None` when the rates are equal: samples pass through.
    inner: Option<FftFixedIn<f32>>,
    pending: Vec<f32>,
    /// Output samples still to drop: the filter's delay, so output lines up with input.
    delay_left: usize,
    consumed: u64,
    produced: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("from", &self.from)
            .field("to", &self.to)
            .finish()
    }
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> Result<Self> {
        let err = |reason: String| TtsError::Resample { from, to, reason };
        if from == 0 || to == 0 {
            return Err(err("sample rates must be positive".into()));
        }
        let inner = if from == to {
            None
        } else {
            Some(
                FftFixedIn::<f32>::new(from as usize, to as usize, CHUNK_IN, 2, 1)
                    .map_err(|e| err(e.to_string()))?,
            )
        };
        let delay_left = inner.as_ref().map_or(0, |r| r.output_delay());
        Ok(StreamResampler {
            from,
            to,
            inner,
            pending: Vec::new(),
            delay_left,
            consumed: 0,
            produced: 0,
        })
    }

    pub fn output_rate(&self) -> u32 {
        self.to
    }

    /// Resamples what it can of `samples`; keeps the rest for the next call.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<f32>> {
        self.consumed += samples.len() as u64;
        let Some(inner) = self.inner.as_mut() else {
            self.produced += samples.len() as u64;
            return Ok(samples.to_vec());
        };
        self.pending.extend_from_slice(samples);
        let mut out = Vec::new();
        let mut used = 0;
        while self.pending.len() - used >= inner.input_frames_next() {
            let n = inner.input_frames_next();
            let block = inner
                .process(&[&self.pending[used..used + n]], None)
                .map_err(|e| TtsError::Resample {
                    from: self.from,
                    to: self.to,
                    reason: e.to_string(),
                })?;
            used += n;
            Self::emit(&mut self.delay_left, &block[0], &mut out);
        }
        self.pending.drain(..used);
        self.produced += out.len() as u64;
        Ok(out)
    }

    /// Flushes the remaining input and the filter's tail; the total output is the input length
    /// times the rate ratio.
    pub fn finish(&mut self) -> Result<Vec<f32>> {
        let expected = (self.consumed * u64::from(self.to)).div_ceil(u64::from(self.from));
        let Some(inner) = self.inner.as_mut() else {
            return Ok(Vec::new());
        };
        let err = |e: rubato::ResampleError| TtsError::Resample {
            from: self.from,
            to: self.to,
            reason: e.to_string(),
        };
        let mut out = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        if !pending.is_empty() {
            let block = inner
                .process_partial(Some(&[&pending[..]]), None)
                .map_err(err)?;
            Self::emit(&mut self.delay_left, &block[0], &mut out);
        }
        // Zeros push the delayed samples out; a few blocks cover any filter length.
        let mut guard = 0;
        while self.produced + (out.len() as u64) < expected && guard < 8 {
            let block = inner.process_partial::<&[f32]>(None, None).map_err(err)?;
            Self::emit(&mut self.delay_left, &block[0], &mut out);
            guard += 1;
        }
        let keep = expected.saturating_sub(self.produced) as usize;
        out.truncate(keep);
        self.produced += out.len() as u64;
        Ok(out)
    }

    fn emit(delay_left: &mut usize, block: &[f32], out: &mut Vec<f32>) {
        let skip = (*delay_left).min(block.len());
        *delay_left -= skip;
        out.extend_from_slice(&block[skip..]);
    }
}

/// Resamples a whole buffer.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    let mut r = StreamResampler::new(from, to)?;
    let mut out = r.push(samples)?;
    out.extend(r.finish()?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f32, rate: u32, seconds: f32) -> Vec<f32> {
        let n = (rate as f32 * seconds) as usize;
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    /// Upward zero crossings per second: the frequency, if the resampler kept it.
    fn frequency(samples: &[f32], rate: u32) -> f32 {
        let crossings = samples
            .windows(2)
            .filter(|w| w[0] < 0.0 && w[1] >= 0.0)
            .count();
        crossings as f32 * rate as f32 / samples.len() as f32
    }

    #[test]
    fn piper_rate_to_transport_rates_keeps_length_and_pitch() {
        let input = sine(440.0, 22_050, 1.0);
        for to in [48_000, 16_000, 8_000] {
            let out = resample(&input, 22_050, to).unwrap();
            assert_eq!(out.len(), to as usize, "length at {to} Hz");
            let f = frequency(&out, to);
            assert!((f - 440.0).abs() < 3.0, "{to} Hz: {f} Hz");
            // Aligned, not delayed: the first samples follow the sine's start.
            let expected_first =
                (2.0 * std::f32::consts::PI * 440.0 * 20.0 / to as f32).sin() * 0.5;
            assert!(
                (out[20] - expected_first).abs() < 0.05,
                "{to} Hz: {}",
                out[20]
            );
        }
    }

    #[test]
    fn streaming_in_pieces_equals_one_shot() {
        let input = sine(300.0, 22_050, 0.7);
        let whole = resample(&input, 22_050, 48_000).unwrap();
        let mut r = StreamResampler::new(22_050, 48_000).unwrap();
        let mut pieces = Vec::new();
        for part in input.chunks(777) {
            pieces.extend(r.push(part).unwrap());
        }
        pieces.extend(r.finish().unwrap());
        assert_eq!(pieces.len(), whole.len());
        let max_diff = pieces
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "{max_diff}");
    }

    #[test]
    fn same_rate_passes_through_and_zero_rate_is_an_error() {
        assert_eq!(
            resample(&[0.1, 0.2], 16_000, 16_000).unwrap(),
            vec![0.1, 0.2]
        );
        assert!(StreamResampler::new(0, 16_000).is_err());
    }
}
