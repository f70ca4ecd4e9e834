//! Exact cosine search over one contiguous, row-major matrix of unit vectors.
//!
//! Rows are normalized once at decode, so cosine similarity is a plain dot
//! product; the scan is linear and exact (no approximate index), which is the
//! right trade below a few million rows and keeps results reproducible.

use super::topk::TopK;
use std::sync::atomic::{AtomicBool, Ordering};

/// Writes `v / |v|` to `out`. The norm is accumulated in f64: squares of f32
/// values near `f32::MAX` (or subnormals) would overflow (or vanish) in f32
/// and turn a valid vector into zeros. `None` for a zero or non-finite norm.
pub(crate) fn normalize_into(v: &[f32], out: &mut Vec<f32>) -> Option<()> {
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return None;
    }
    out.extend(v.iter().map(|x| (f64::from(*x) / norm) as f32));
    Some(())
}

/// Dot product with eight independent accumulators, a shape the compiler
/// turns into SIMD lanes without `unsafe` or target-specific code.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// The `k` rows of `matrix` (row length `dim`) with the largest dot product
/// with the unit vector `query`, best first.
/// Stops early (answering what it has) once `stop` is set: the job that
/// asked was dropped, and nobody will read the answer.
pub(crate) fn top_k(
    matrix: &[f32],
    dim: usize,
    query: &[f32],
    k: usize,
    stop: &AtomicBool,
) -> Vec<(u32, f32)> {
    let mut top = TopK::new(k);
    if dim == 0 {
        return top.into_sorted();
    }
    for (i, row) in matrix.chunks_exact(dim).enumerate() {
        if i % STOP_CHECK_ROWS == 0 && stop.load(Ordering::Relaxed) {
            break;
        }
        top.push(i as u32, dot(row, query));
    }
    top.into_sorted()
}

/// Rows scanned between two looks at the stop flag (~1 ms at dim 1024).
const STOP_CHECK_ROWS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_survives_extreme_magnitudes() {
        let mut out = Vec::new();
        normalize_into(&[f32::MAX, f32::MAX], &mut out).unwrap();
        assert!((out[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        out.clear();
        let tiny = f32::from_bits(1); // smallest subnormal
        normalize_into(&[tiny, 0.0], &mut out).unwrap();
        assert_eq!(out, vec![1.0, 0.0]);
        assert!(normalize_into(&[0.0, 0.0], &mut Vec::new()).is_none());
        assert!(normalize_into(&[f32::NAN, 1.0], &mut Vec::new()).is_none());
    }

    #[test]
    fn dot_matches_naive_sum_for_odd_lengths() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }
}
