//! Q8_0 matrices and the matrix-vector kernel the forward pass spends its time in.
//!
//! Hand-written rather than candle's `QMatMul` for two measured reasons:
//! - candle picks its SIMD kernels at *compile* time (`#[cfg(target_feature = "avx2")]`), so a
//!   portable build (no `target-cpu=native`) runs the scalar Q8_0 dot product. Here AVX2 is
//!   detected at run time, so the same binary is fast on any x86-64 with AVX2 and still correct
//!   without it.
//! - `QMatMul::forward` allocates its output tensor and the quantized activations on every call;
//!   these kernels write into caller-owned buffers, so decoding a token allocates nothing.
//!
//! The layout splits ggml's 34-byte blocks into a scale array and a quant array, so the SIMD
//! loads of the 32 quants are contiguous and the scales are plain `f32`.

use rayon::prelude::*;

/// Values per block, as in ggml's Q8_0.
pub const BLOCK: usize = 32;

/// A row-major matrix in Q8_0: `rows` rows of `cols` values, `cols` a multiple of [`BLOCK`].
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// One scale per block, `rows * cols / BLOCK`.
    pub d: Vec<f32>,
    /// The quants, `rows * cols`.
    pub q: Vec<i8>,
}

impl Q8Matrix {
    /// Quantizes a row-major f32 matrix the way ggml does (scale = amax / 127, round to nearest).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        let mut m = Q8Matrix {
            rows,
            cols,
            d: vec![0.0; rows * cols / BLOCK],
            q: vec![0; rows * cols],
        };
        quantize_into(values, &mut m.d, &mut m.q);
        m
    }

    /// Copies ggml Q8_0 blocks (f16 scale + 32 quants, 34 bytes each) without requantizing.
    pub fn from_ggml_q8_0(rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        let blocks = rows * cols / BLOCK;
        if bytes.len() != blocks * 34 {
            return None;
        }
        let mut d = Vec::with_capacity(blocks);
        let mut q = Vec::with_capacity(rows * cols);
        for block in bytes.chunks_exact(34) {
            d.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            q.extend(block[2..].iter().map(|&b| b as i8));
        }
        Some(Q8Matrix { rows, cols, d, q })
    }

    /// Row `r` dequantized into `out` (embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / BLOCK;
        let q = &self.q[r * self.cols..(r + 1) * self.cols];
        let d = &self.d[r * bpr..(r + 1) * bpr];
        for ((o, q), d) in out
            .chunks_exact_mut(BLOCK)
            .zip(q.chunks_exact(BLOCK))
            .zip(d)
        {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = *d * q as f32;
            }
        }
    }

    /// ggml Q8_0 bytes of the whole matrix (for writing a GGUF).
    pub fn to_ggml_q8_0(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.d.len() * 34);
        for (d, q) in self.d.iter().zip(self.q.chunks_exact(BLOCK)) {
            out.extend_from_slice(&half::f16::from_f32(*d).to_le_bytes());
            out.extend(q.iter().map(|&v| v as u8));
        }
        out
    }
}

/// Quantizes `x` (a multiple of [`BLOCK`] long) into per-block scales and quants.
pub fn quantize_into(x: &[f32], d: &mut [f32], q: &mut [i8]) {
    for ((x, d), q) in x
        .chunks_exact(BLOCK)
        .zip(d.iter_mut())
        .zip(q.chunks_exact_mut(BLOCK))
    {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        // ggml stores the scale as f16; round-trip it so activations and weights quantized here
        // match what a ggml Q8_0 file would hold.
        let scale = half::f16::from_f32(scale).to_f32();
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        *d = scale;
        for (q, v) in q.iter_mut().zip(x) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Quantized activations: `rows` vectors of `cols` values, reused across calls.
#[derive(Debug, Default)]
pub struct Q8Act {
    pub rows: usize,
    pub cols: usize,
    pub d: Vec<f32>,
    pub q: Vec<i8>,
}

impl Q8Act {
    /// Quantizes `x` (`rows * cols`) in place of the previous contents. Grows the buffers only
    /// when a larger batch than ever before arrives.
    pub fn set(&mut self, x: &[f32], rows: usize, cols: usize) {
        debug_assert_eq!(x.len(), rows * cols);
        self.rows = rows;
        self.cols = cols;
        resize(&mut self.d, rows * cols / BLOCK);
        resize(&mut self.q, rows * cols);
        quantize_into(x, &mut self.d, &mut self.q);
    }
}

fn resize<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() != len {
        v.resize(len, T::default());
    }
}

/// `out[r][i] = dot(w[i], a[r])` for every activation row `r`: `out` is `a.rows * w.rows`.
///
/// Work is split over weight rows (each thread streams its own slice of the weights once and
/// applies it to every activation row). `scratch` holds the transposed result when there is more
/// than one activation row; it only grows.
pub fn matmul(
    pool: &rayon::ThreadPool,
    w: &Q8Matrix,
    a: &Q8Act,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    matmul_with(Kernel::detect(), pool, w, a, out, scratch)
}

fn matmul_with(
    kernel: Kernel,
    pool: &rayon::ThreadPool,
    w: &Q8Matrix,
    a: &Q8Act,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert_eq!(
        w.cols, a.cols,
        "invariant: weights and activations share the inner dimension"
    );
    let n = w.rows;
    let m = a.rows;
    debug_assert_eq!(out.len(), n * m);
    let bpr = w.cols / BLOCK;
    // Chunks small enough to balance two to sixteen threads, large enough to amortise rayon.
    let chunk = (n / (pool.current_num_threads() * 8)).clamp(16, 1024) / 4 * 4;
    if m == 1 {
        pool.install(|| {
            out.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(ci, out)| rows_dot(kernel, w, ci * chunk, &a.q, &a.d, out))
        });
        return;
    }
    resize(scratch, n * m);
    pool.install(|| {
        scratch
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(ci, out_t)| {
                let r0 = ci * chunk;
                let rows = out_t.len() / m;
                let mut col = [0f32; 4];
                let mut tile = [[0f32; 4]; 4];
                // Four weight rows at a time stay in L1 while every activation row passes.
                let mut i = 0;
                while i < rows {
                    let group = (rows - i).min(4);
                    if group == 4 {
                        let r = r0 + i;
                        // Up to four activation rows per kernel call (see `dot4_rows`).
                        for j0 in (0..m).step_by(4) {
                            let n = (m - j0).min(4);
                            kernel.dot4_rows(
                                &w.q[r * w.cols..(r + 4) * w.cols],
                                &w.d[r * bpr..(r + 4) * bpr],
                                &a.q[j0 * a.cols..(j0 + n) * a.cols],
                                &a.d[j0 * bpr..(j0 + n) * bpr],
                                &mut tile[..n],
                            );
                            for (j, v) in tile[..n].iter().enumerate() {
                                for (g, v) in v.iter().enumerate() {
                                    out_t[(i + g) * m + j0 + j] = *v;
                                }
                            }
                        }
                    } else {
                        for j in 0..m {
                            rows_dot(
                                kernel,
                                w,
                                r0 + i,
                                &a.q[j * a.cols..(j + 1) * a.cols],
                                &a.d[j * bpr..(j + 1) * bpr],
                                &mut col[..group],
                            );
                            for (g, v) in col[..group].iter().enumerate() {
                                out_t[(i + g) * m + j] = *v;
                            }
                        }
                    }
                    i += group;
                }
            })
    });
    for (i, col) in scratch.chunks_exact(m).enumerate() {
        for (j, v) in col.iter().enumerate() {
            out[j * n + i] = *v;
        }
    }
}

/// `out[i] = dot(w[r0 + i], a)` for each `i`, four rows per kernel call.
fn rows_dot(kernel: Kernel, w: &Q8Matrix, r0: usize, aq: &[i8], ad: &[f32], out: &mut [f32]) {
    let bpr = w.cols / BLOCK;
    let mut i = 0;
    while i + 4 <= out.len() {
        let r = r0 + i;
        let v = kernel.dot4(
            &w.q[r * w.cols..(r + 4) * w.cols],
            &w.d[r * bpr..(r + 4) * bpr],
            aq,
            ad,
        );
        out[i..i + 4].copy_from_slice(&v);
        i += 4;
    }
    for (k, o) in out[i..].iter_mut().enumerate() {
        let r = r0 + i + k;
        *o = kernel.dot(
            &w.q[r * w.cols..(r + 1) * w.cols],
            &w.d[r * bpr..(r + 1) * bpr],
            aq,
            ad,
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 with VNNI: one `vpdpbusd` does the 64 multiply-adds of two blocks that take
    /// AVX2 four instructions per block.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs, detected once. `TALKLINE_LLM_KERNEL` (`scalar`,
    /// `avx2`, `avx512vnni`) picks a slower one instead, to compare them in one build.
    fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let available = Kernel::available();
            let wanted = std::env::var("TALKLINE_LLM_KERNEL").unwrap_or_default();
            available
                .iter()
                .find(|k| format!("{k:?}").eq_ignore_ascii_case(&wanted))
                .or(available.last())
                .copied()
                .unwrap_or(Kernel::Scalar)
        })
    }

    /// Every kernel this CPU can run, slowest first.
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                kernels.push(Kernel::Avx2);
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vnni")
                {
                    kernels.push(Kernel::Avx512Vnni);
                }
            }
        }
        kernels
    }

    /// Four consecutive weight rows (`wq`, `wd` hold all four) against one activation row.
    #[inline]
    fn dot4(self, wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32]) -> [f32; 4] {
        match self {
            Kernel::Scalar => {
                let (k, b) = (aq.len(), ad.len());
                std::array::from_fn(|i| {
                    dot_scalar(&wq[i * k..(i + 1) * k], &wd[i * b..(i + 1) * b], aq, ad)
                })
            }
            // SAFETY: `available` offers Avx2 only after checking the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { dot4_avx2(wq, wd, aq, ad) },
            // SAFETY: `available` offers it only after checking AVX-512 F, BW and VNNI.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { dot4xm_avx512vnni::<1>(wq, wd, aq, ad)[0] },
        }
    }

    /// Four consecutive weight rows against one to four activation rows (`aq`, `ad` hold them
    /// all): `out[j][r]` = dot(weight row r, activation row j). With AVX-512 each weight block is
    /// loaded once for all of them; four activation rows make 16 accumulators, half of
    /// AVX-512's registers.
    fn dot4_rows(self, wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32], out: &mut [[f32; 4]]) {
        let m = out.len();
        let (k, blocks) = (aq.len() / m, ad.len() / m);
        match self {
            // SAFETY: `available` offers it only after checking AVX-512 F, BW and VNNI.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe {
                match out {
                    [o0, o1, o2, o3] => {
                        [*o0, *o1, *o2, *o3] = dot4xm_avx512vnni::<4>(wq, wd, aq, ad);
                    }
                    [o0, o1, o2] => [*o0, *o1, *o2] = dot4xm_avx512vnni::<3>(wq, wd, aq, ad),
                    [o0, o1] => [*o0, *o1] = dot4xm_avx512vnni::<2>(wq, wd, aq, ad),
                    [o0] => [*o0] = dot4xm_avx512vnni::<1>(wq, wd, aq, ad),
                    _ => unreachable!("invariant: one to four activation rows per call"),
                }
            },
            _ => {
                for (j, out) in out.iter_mut().enumerate() {
                    *out = self.dot4(
                        wq,
                        wd,
                        &aq[j * k..(j + 1) * k],
                        &ad[j * blocks..(j + 1) * blocks],
                    );
                }
            }
        }
    }

    #[inline]
    fn dot(self, wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32]) -> f32 {
        match self {
            Kernel::Scalar => dot_scalar(wq, wd, aq, ad),
            // SAFETY: `available` offers Avx2 only after checking the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { dot_avx2(wq, wd, aq, ad) },
            // A single row is the tail of a matrix whose rows are not a multiple of four: rare
            // enough that the AVX2 code does.
            // SAFETY: `available` offers Avx512Vnni only where AVX2 and FMA were found too.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { dot_avx2(wq, wd, aq, ad) },
        }
    }
}

fn dot_scalar(wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (((wq, aq), wd), ad) in wq
        .chunks_exact(BLOCK)
        .zip(aq.chunks_exact(BLOCK))
        .zip(wd)
        .zip(ad)
    {
        let s: i32 = wq.iter().zip(aq).map(|(&a, &b)| a as i32 * b as i32).sum();
        sum += s as f32 * (wd * ad);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(acc, 1);
    let lo = _mm256_castps256_ps128(acc);
    let s = _mm_add_ps(hi, lo);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// [`dot_avx2`] for four weight rows at once: four independent accumulator chains hide the FMA
/// latency, and each activation block is loaded once for four rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let blocks = ad.len();
    let k = aq.len();
    assert!(
        wq.len() == 4 * k && wd.len() == 4 * blocks && k == blocks * BLOCK,
        "invariant: four weight rows of the activation's length"
    );
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let wp = wq.as_ptr();
    let ap = aq.as_ptr();
    for b in 0..blocks {
        // SAFETY: offsets stay inside the slices, whose lengths were asserted above.
        let a = _mm256_loadu_si256(ap.add(b * BLOCK) as *const __m256i);
        let da = *ad.get_unchecked(b);
        for (r, acc) in acc.iter_mut().enumerate() {
            let w = _mm256_loadu_si256(wp.add(r * k + b * BLOCK) as *const __m256i);
            let aw = _mm256_sign_epi8(w, w);
            let sa = _mm256_sign_epi8(a, w);
            let dot32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), ones);
            let scale = _mm256_set1_ps(*wd.get_unchecked(r * blocks + b) * da);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32), scale, *acc);
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

/// Four weight rows against `M` activation rows with AVX-512 VNNI, two blocks per step: `out[j][r]`.
///
/// `vpdpbusd` multiplies unsigned by signed bytes. ggml moves the weights' signs onto the
/// activations, three instructions per weight and activation pair. Here the activations are made
/// unsigned instead, `a + 128` (a flip of the sign bit), and the accumulator starts at
/// `-128 * sum(w)`, computed once per weight block for all `M` activation rows:
/// `sum((a + 128) * w) - 128 * sum(w) = sum(a * w)`, exactly, in 32-bit integers. So a pair costs
/// one `vpdpbusd`, and the sums are bit for bit those of the sign trick.
///
/// Lanes 0-7 of the 16 sums belong to the first block and 8-15 to the second, so each half is
/// scaled by its own block's scale. An odd last block is loaded masked, its other half zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot4xm_avx512vnni<const M: usize>(
    wq: &[i8],
    wd: &[f32],
    aq: &[i8],
    ad: &[f32],
) -> [[f32; 4]; M] {
    use std::arch::x86_64::*;
    let blocks = ad.len() / M;
    let k = blocks * BLOCK;
    assert!(
        wq.len() == 4 * k && wd.len() == 4 * blocks && aq.len() == M * k && ad.len() == M * blocks,
        "invariant: four weight rows and M activation rows of one length"
    );
    let zero = _mm512_setzero_si512();
    let sign_bit = _mm512_set1_epi8(i8::MIN);
    // Spreads a pair of block scales over the two halves of a vector.
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let pair = |p: *const f32, both: bool| {
        let lo = _mm512_set1_ps(*p);
        if both {
            let two = _mm512_castpd_ps(_mm512_set1_pd((p as *const f64).read_unaligned()));
            _mm512_permutexvar_ps(halves, two)
        } else {
            _mm512_mask_blend_ps(0xFF00, lo, _mm512_setzero_ps())
        }
    };
    let mut acc = [[_mm512_setzero_ps(); 4]; M];
    let wp = wq.as_ptr();
    let ap = aq.as_ptr();
    let mut b = 0;
    while b < blocks {
        let both = b + 1 < blocks;
        // Both blocks of the step, or the last one alone with the upper half zero.
        let mask: __mmask64 = if both { !0 } else { 0xFFFF_FFFF };
        let mut w = [zero; 4];
        let mut bias = [zero; 4];
        let mut w_scale = [_mm512_setzero_ps(); 4];
        for r in 0..4 {
            // SAFETY: `mask` limits the loads to `blocks * 32` quants of each row and `both`
            // the scale reads to `blocks` scales: the asserted lengths.
            w[r] = _mm512_maskz_loadu_epi8(mask, wp.add(r * k + b * BLOCK));
            bias[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, sign_bit, w[r]));
            w_scale[r] = pair(wd.as_ptr().add(r * blocks + b), both);
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above, for activation row `j`. A masked-off byte becomes 128, against
            // a zero weight.
            let a = _mm512_xor_si512(
                _mm512_maskz_loadu_epi8(mask, ap.add(j * k + b * BLOCK)),
                sign_bit,
            );
            let a_scale = pair(ad.as_ptr().add(j * blocks + b), both);
            for r in 0..4 {
                let dot = _mm512_dpbusd_epi32(bias[r], a, w[r]);
                let scale = _mm512_mul_ps(w_scale[r], a_scale);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            }
        }
        b += 2;
    }
    acc.map(|acc| acc.map(|acc| _mm512_reduce_add_ps(acc)))
}

/// The ggml AVX2 Q8_0 x Q8_0 block dot: |w| x sign(a, w) with `maddubs`, widened by `madd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let blocks = wd.len();
    assert!(
        wq.len() == blocks * BLOCK && aq.len() == blocks * BLOCK && ad.len() == blocks,
        "invariant: weight and activation rows have the same number of blocks"
    );
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let wp = wq.as_ptr();
    let ap = aq.as_ptr();
    for b in 0..blocks {
        // SAFETY: both slices hold `blocks * 32` quants (asserted by the callers' slicing).
        let w = _mm256_loadu_si256(wp.add(b * BLOCK) as *const __m256i);
        let a = _mm256_loadu_si256(ap.add(b * BLOCK) as *const __m256i);
        let aw = _mm256_sign_epi8(w, w);
        let sa = _mm256_sign_epi8(a, w);
        let dot16 = _mm256_maddubs_epi16(aw, sa);
        let dot32 = _mm256_madd_epi16(dot16, ones);
        let scale = _mm256_set1_ps(*wd.get_unchecked(b) * *ad.get_unchecked(b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32), scale, acc);
    }
    hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_kernels_agree() {
        // 42 rows: ten four-row groups and a two-row tail; 96 columns are an odd number
        // of blocks, the AVX-512 kernel's masked last step.
        for cols in [96, 128] {
            kernels_agree(cols, 42);
        }
    }

    /// A full tile of four activation rows and a tail of three.
    const ACT_ROWS: usize = 7;

    fn kernels_agree(cols: usize, rows: usize) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let x: Vec<f32> = (0..ACT_ROWS * cols)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let wm = Q8Matrix::from_f32(rows, cols, &w);
        let mut act = Q8Act::default();
        act.set(&x, ACT_ROWS, cols);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a two-thread pool can be built");
        for kernel in Kernel::available() {
            let mut out = vec![0.0; ACT_ROWS * rows];
            let mut scratch = Vec::new();
            matmul_with(kernel, &pool, &wm, &act, &mut out, &mut scratch);
            check_against_scalar_and_exact(&w, &x, &wm, &act, &out, rows, cols, kernel);
            // A batch (prefill) and one row at a time (decode) give the same bits, so a
            // transcript prefilled in the background continues exactly as a fresh prompt would.
            for j in 0..ACT_ROWS {
                let mut one = Q8Act::default();
                one.set(&x[j * cols..(j + 1) * cols], 1, cols);
                let mut single = vec![0.0; rows];
                matmul_with(kernel, &pool, &wm, &one, &mut single, &mut scratch);
                assert_eq!(single, out[j * rows..(j + 1) * rows], "{kernel:?}, row {j}");
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_against_scalar_and_exact(
        w: &[f32],
        x: &[f32],
        wm: &Q8Matrix,
        act: &Q8Act,
        out: &[f32],
        rows: usize,
        cols: usize,
        kernel: Kernel,
    ) {
        for j in 0..ACT_ROWS {
            for r in 0..rows {
                let bpr = cols / BLOCK;
                let scalar = dot_scalar(
                    &wm.q[r * cols..(r + 1) * cols],
                    &wm.d[r * bpr..(r + 1) * bpr],
                    &act.q[j * cols..(j + 1) * cols],
                    &act.d[j * bpr..(j + 1) * bpr],
                );
                let exact: f32 = (0..cols).map(|c| w[r * cols + c] * x[j * cols + c]).sum();
                // Quantization error scales with the magnitude of the terms, not of their sum.
                let magnitude: f32 = (0..cols)
                    .map(|c| (w[r * cols + c] * x[j * cols + c]).abs())
                    .sum();
                let got = out[j * rows + r];
                assert!(
                    (got - scalar).abs() <= 1e-3 * scalar.abs().max(1.0),
                    "{kernel:?}: {got} {scalar}"
                );
                assert!(
                    (got - exact).abs() <= 0.01 * magnitude,
                    "{kernel:?}: {got} {exact} {magnitude}"
                );
            }
        }
    }

    #[test]
    fn ggml_bytes_round_trip() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 - 31.5).collect();
        let m = Q8Matrix::from_f32(2, 32, &w);
        let back = Q8Matrix::from_ggml_q8_0(2, 32, &m.to_ggml_q8_0()).expect("right length");
        assert_eq!(back.q, m.q);
        assert_eq!(back.d, m.d);
    }
}
