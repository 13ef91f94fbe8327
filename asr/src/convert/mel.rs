//! The mel filterbank that whisper.cpp expects inside a ggml model file.
//!
//! Whisper was trained on librosa's Slaney-style filterbank (`librosa.filters.mel(sr=16000,
//! n_fft=400, n_mels=80)`, `htk=False`, `norm="slaney"`). CTranslate2 checkpoints do not carry it,
//! so we compute it here, in f64 like librosa, and store it as f32.

/// Whisper's STFT size at 16 kHz.
pub const N_FFT: usize = 400;
pub const SAMPLE_RATE: f64 = 16_000.0;

fn hz_to_mel(hz: f64) -> f64 {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    let min_log_mel = MIN_LOG_HZ / F_SP;
    let logstep = (6.4f64).ln() / 27.0;
    if hz >= MIN_LOG_HZ {
        min_log_mel + (hz / MIN_LOG_HZ).ln() / logstep
    } else {
        hz / F_SP
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    let min_log_mel = MIN_LOG_HZ / F_SP;
    let logstep = (6.4f64).ln() / 27.0;
    if mel >= min_log_mel {
        MIN_LOG_HZ * (logstep * (mel - min_log_mel)).exp()
    } else {
        F_SP * mel
    }
}

/// Returns `n_mels` rows of `N_FFT / 2 + 1` weights, row-major.
pub fn slaney_mel_filters(n_mels: usize) -> Vec<f32> {
    let n_bins = N_FFT / 2 + 1;
    let fft_freqs: Vec<f64> = (0..n_bins)
        .map(|i| i as f64 * (SAMPLE_RATE / 2.0) / (n_bins - 1) as f64)
        .collect();
    let (mel_min, mel_max) = (hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2.0));
    let mel_points: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = Vec::with_capacity(n_mels * n_bins);
    for m in 0..n_mels {
        let (left, center, right) = (mel_points[m], mel_points[m + 1], mel_points[m + 2]);
        let enorm = 2.0 / (right - left);
        for &f in &fft_freqs {
            let lower = (f - left) / (center - left);
            let upper = (right - f) / (right - center);
            weights.push((lower.min(upper).max(0.0) * enorm) as f32);
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_openai_whisper_mel_filters() {
        // Reference values: `whisper/assets/mel_filters.npz` ("mel_80") shipped in the
        // openai-whisper package (librosa's filterbank, stored as f32). Total weight: 1.999024.
        let w = slaney_mel_filters(80);
        assert_eq!(w.len(), 80 * 201);
        let at = |m: usize, k: usize| w[m * 201 + k];
        for (m, k, expected) in [
            (0, 1, 0.024_862_595),
            (0, 2, 0.0),
            (10, 10, 0.019_908_218),
            (40, 43, 0.014_735_566),
            (60, 93, 0.006_591_093),
            (79, 199, 0.000_448_759),
            (79, 200, 0.0),
        ] {
            assert!(
                (at(m, k) - expected).abs() < 1e-7,
                "[{m},{k}] = {} != {expected}",
                at(m, k)
            );
        }
        let total: f64 = w.iter().map(|&v| v as f64).sum();
        assert!((total - 1.999_024).abs() < 1e-4, "{total}");
        // Every filter is a non-negative triangle with some weight.
        for m in 0..80 {
            let row = &w[m * 201..(m + 1) * 201];
            assert!(row.iter().all(|&v| v >= 0.0));
            assert!(row.iter().any(|&v| v > 0.0), "filter {m} is empty");
        }
    }
}
