//! Input helpers: any PCM in, 16 kHz mono f32 out.

use std::path::Path;

use rubato::{FftFixedIn, Resampler};

use crate::error::{AsrError, Result};
use crate::whisper::SAMPLE_RATE;

/// Replaces NaN and infinities with silence and clamps to [-1, 1]; returns how many samples were
/// not finite. Bad samples must not reach Whisper or the VAD, whose outputs turn to NaN.
pub fn sanitize(samples: &mut [f32]) -> usize {
    let mut bad = 0;
    for s in samples.iter_mut() {
        if !s.is_finite() {
            *s = 0.0;
            bad += 1;
        } else {
            *s = s.clamp(-1.0, 1.0);
        }
    }
    bad
}

pub fn i16_to_f32(samples: &[i16]) -> Vec<f32> {
    samples.iter().map(|&s| s as f32 / 32768.0).collect()
}

/// Averages interleaved channels into one.
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect()
}

/// Streaming resampler from any rate to 16 kHz (a pass-through at 16 kHz). The resampler's own
/// delay is removed, so output sample `n` lines up with input time `n / 16000`.
pub struct To16k {
    input_rate: u32,
    inner: Option<FftFixedIn<f32>>,
    pending: Vec<f32>,
    out: Vec<Vec<f32>>,
    delay_to_skip: usize,
    input_total: u64,
    output_total: u64,
}

/// Input frames per resampler call: 10 ms at 48 kHz; small enough to keep latency low.
const RESAMPLER_CHUNK: usize = 480;

impl To16k {
    pub fn new(input_rate: u32) -> Result<Self> {
        if input_rate == 0 {
            return Err(AsrError::AudioFormat {
                sample_rate: 0,
                channels: 1,
            });
        }
        let inner = if input_rate == SAMPLE_RATE {
            None
        } else {
            let r = FftFixedIn::new(
                input_rate as usize,
                SAMPLE_RATE as usize,
                RESAMPLER_CHUNK,
                2,
                1,
            )
            .map_err(|e| AsrError::Inference(format!("resampler: {e}")))?;
            Some(r)
        };
        Ok(To16k {
            input_rate,
            delay_to_skip: inner.as_ref().map_or(0, |r| r.output_delay()),
            inner,
            pending: Vec::new(),
            out: vec![Vec::new()],
            input_total: 0,
            output_total: 0,
        })
    }

    /// Feeds mono samples; returns the 16 kHz samples ready so far.
    pub fn push(&mut self, input: &[f32]) -> Vec<f32> {
        self.input_total += input.len() as u64;
        let mut produced = Vec::new();
        self.process(input, &mut produced);
        produced
    }

    fn process(&mut self, input: &[f32], produced: &mut Vec<f32>) {
        let Some(resampler) = &mut self.inner else {
            produced.extend_from_slice(input);
            self.output_total += input.len() as u64;
            return;
        };
        self.pending.extend_from_slice(input);
        while self.pending.len() >= resampler.input_frames_next() {
            let n = resampler.input_frames_next();
            self.out[0].resize(resampler.output_frames_next(), 0.0);
            match resampler.process_into_buffer(&[&self.pending[..n]], &mut self.out, None) {
                Ok((_, written)) => {
                    let skip = self.delay_to_skip.min(written);
                    self.delay_to_skip -= skip;
                    produced.extend_from_slice(&self.out[0][skip..written]);
                    self.output_total += (written - skip) as u64;
                }
                Err(e) => tracing::warn!("resampler dropped a chunk: {e}"),
            }
            self.pending.drain(..n);
        }
    }

    /// Pushes out what is still buffered (end of stream), up to the length the input implies.
    pub fn flush(&mut self) -> Vec<f32> {
        let expected = self.input_total * SAMPLE_RATE as u64 / self.input_rate as u64;
        let mut produced = Vec::new();
        let silence = vec![0.0; RESAMPLER_CHUNK];
        // The zeros push the delayed tail out; a bounded loop, since each call yields output.
        for _ in 0..16 {
            if self.output_total >= expected || self.inner.is_none() {
                break;
            }
            self.process(&silence, &mut produced);
        }
        let surplus = self.output_total.saturating_sub(expected) as usize;
        produced.truncate(produced.len().saturating_sub(surplus));
        self.output_total = self.output_total.min(expected);
        produced
    }
}

/// Resamples a whole buffer to 16 kHz.
pub fn resample_to_16k(samples: &[f32], input_rate: u32) -> Result<Vec<f32>> {
    let mut r = To16k::new(input_rate)?;
    let mut out = r.push(samples);
    out.extend(r.flush());
    Ok(out)
}

/// Sample rates a WAV file may have: telephony's 8 kHz down to 4 kHz, studio 768 kHz up.
const WAV_RATES: std::ops::RangeInclusive<u32> = 4_000..=768_000;

/// Reads a WAV file (4-768 kHz, 8/16/24/32-bit integer or 32-bit float, any channel count) into
/// 16 kHz mono f32, with non-finite samples silenced.
pub fn read_wav_16k(path: &Path) -> Result<Vec<f32>> {
    let reader = hound::WavReader::open(path).map_err(|e| AsrError::BadAudioFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    wav_to_16k(reader, path)
}

/// [`read_wav_16k`] of a WAV file's bytes; `name` only names it in errors. The fuzz target
/// `wav` drives the decoding through here without a file system.
pub fn decode_wav_16k(bytes: &[u8], name: &Path) -> Result<Vec<f32>> {
    let reader =
        hound::WavReader::new(std::io::Cursor::new(bytes)).map_err(|e| AsrError::BadAudioFile {
            path: name.to_path_buf(),
            reason: e.to_string(),
        })?;
    wav_to_16k(reader, name)
}

fn wav_to_16k<R: std::io::Read>(reader: hound::WavReader<R>, path: &Path) -> Result<Vec<f32>> {
    let bad = |reason: String| AsrError::BadAudioFile {
        path: path.to_path_buf(),
        reason,
    };
    let spec = reader.spec();
    // The resampler's FFT grows with the rate's ratio to 16 kHz, and its output with the inverse
    // of the rate: a header claiming 1 Hz or 4 GHz would exhaust memory, so such files are
    // refused rather than trusted.
    if spec.channels == 0 || !WAV_RATES.contains(&spec.sample_rate) {
        return Err(bad(format!(
            "{} channel(s) at {} Hz (rates of {}-{} Hz are read)",
            spec.channels,
            spec.sample_rate,
            WAV_RATES.start(),
            WAV_RATES.end()
        )));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?
        }
    };
    let mut mono = downmix(&interleaved, spec.channels as usize);
    sanitize(&mut mono);
    let mut out = resample_to_16k(&mono, spec.sample_rate)?;
    sanitize(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_silences_nan_and_clamps_clipping() {
        let mut s = [f32::NAN, 2.0, -f32::INFINITY, 0.5, -3.0];
        assert_eq!(sanitize(&mut s), 2);
        assert_eq!(s, [0.0, 1.0, 0.0, 0.5, -1.0]);
    }

    #[test]
    fn wav_headers_with_absurd_rates_are_refused_not_resampled() {
        let wav = |rate: u32| {
            let mut bytes = std::io::Cursor::new(Vec::new());
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: rate,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            let mut writer = hound::WavWriter::new(&mut bytes, spec).unwrap();
            for i in 0..64 {
                writer.write_sample((i * 300) as i16).unwrap();
            }
            writer.finalize().unwrap();
            bytes.into_inner()
        };
        let name = Path::new("x.wav");
        for rate in [1, 3_999, 768_001, 2_000_000_000] {
            assert!(decode_wav_16k(&wav(rate), name).is_err(), "{rate} Hz");
        }
        assert_eq!(decode_wav_16k(&wav(16_000), name).unwrap().len(), 64);
        assert_eq!(decode_wav_16k(&wav(8_000), name).unwrap().len(), 128);
    }

    #[test]
    fn downmix_averages_channels() {
        assert_eq!(downmix(&[1.0, 0.0, 0.5, 0.5], 2), vec![0.5, 0.5]);
    }

    #[test]
    fn resampling_keeps_duration_and_frequency() {
        for rate in [8_000u32, 22_050, 44_100, 48_000] {
            let tone: Vec<f32> = (0..rate)
                .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin() * 0.5)
                .collect();
            let out = resample_to_16k(&tone, rate).unwrap();
            let expected = 16_000i64;
            assert!(
                (out.len() as i64 - expected).abs() < 200,
                "{rate}: {} samples",
                out.len()
            );
            // 440 Hz: about 880 zero crossings per second, wherever it came from.
            let crossings = out[1000..15000]
                .windows(2)
                .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
                .count() as f64
                / (14_000.0 / 16_000.0);
            assert!((crossings - 880.0).abs() < 20.0, "{rate}: {crossings}");
        }
    }

    #[test]
    fn non_wav_and_empty_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let not_wav = dir.path().join("x.wav");
        std::fs::write(&not_wav, b"ID3 this is an mp3").unwrap();
        let err = read_wav_16k(&not_wav).unwrap_err().to_string();
        assert!(err.contains("x.wav"), "{err}");
        let empty = dir.path().join("empty.wav");
        std::fs::write(&empty, b"").unwrap();
        assert!(read_wav_16k(&empty).is_err());
    }
}
