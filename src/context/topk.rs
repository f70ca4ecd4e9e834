//! Bounded top-k selection shared by both searches: a min-heap of at most k
//! candidates, so ranking N documents costs O(N log k) and O(k) memory instead
//! of sorting all N.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// A scored document. Ordered by "better": higher score first, then lower
/// document index, so ties break deterministically by document order.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    doc: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.doc.cmp(&self.doc))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// Keeps the k best `(doc, score)` pairs seen.
pub(crate) struct TopK {
    k: usize,
    // `Reverse` turns the max-heap into a min-heap: the worst kept candidate
    // sits on top, ready to be replaced by a better one.
    heap: BinaryHeap<Reverse<Candidate>>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    pub(crate) fn push(&mut self, doc: u32, score: f32) {
        let c = Candidate { score, doc };
        if self.heap.len() < self.k {
            self.heap.push(Reverse(c));
        } else if let Some(mut worst) = self.heap.peek_mut()
            && c > worst.0
        {
            *worst = Reverse(c);
        }
    }

    /// The kept pairs, best first.
    pub(crate) fn into_sorted(self) -> Vec<(u32, f32)> {
        // Ascending order of `Reverse<_>` is descending order of candidates.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(c)| (c.doc, c.score))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_k_and_breaks_ties_by_document_order() {
        let mut t = TopK::new(3);
        for (doc, score) in [(0, 0.5), (1, 0.9), (2, 0.5), (3, 0.1), (4, 0.9), (5, 0.7)] {
            t.push(doc, score);
        }
        assert_eq!(t.into_sorted(), vec![(1, 0.9), (4, 0.9), (5, 0.7)]);
    }

    #[test]
    fn equal_scores_keep_the_earliest_documents() {
        let mut t = TopK::new(2);
        for doc in (0..10).rev() {
            t.push(doc, 1.0);
        }
        assert_eq!(t.into_sorted(), vec![(0, 1.0), (1, 1.0)]);
    }

    #[test]
    fn k_zero_keeps_nothing() {
        let mut t = TopK::new(0);
        t.push(0, 1.0);
        assert!(t.into_sorted().is_empty());
    }

    #[test]
    fn matches_a_full_sort() {
        let scores: Vec<f32> = (0..500u32).map(|i| ((i * 7919) % 97) as f32).collect();
        let mut t = TopK::new(25);
        for (i, s) in scores.iter().enumerate() {
            t.push(i as u32, *s);
        }
        let mut all: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u32, *s))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(25);
        assert_eq!(t.into_sorted(), all);
    }
}
