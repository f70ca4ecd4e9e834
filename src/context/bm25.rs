//! A compact BM25 inverted index, built once at decode and then only read.
//!
//! Written here rather than taken from a crate: `tantivy` is a whole search
//! engine (segments, a directory, its own threads, minutes to compile on the
//! build machines), and the `bm25` crate's scorer keeps per-document maps
//! behind `&mut self` mutation APIs. What a node needs is the opposite: one
//! frozen structure in an `Arc`, searched concurrently through `&self` by
//! thousands of instances, without locks or per-search copies of the index.
//! That is a term dictionary plus postings in one flat array (CSR), which is
//! less code than adapting either crate.
//!
//! Tokenizer: split on every character that is not alphanumeric (Unicode),
//! lowercase what remains. No stemming and no stop words, so scores are easy
//! to predict and to compute by hand.
//!
//! Scoring, with k1 = 1.2 and b = 0.75, summed over distinct query terms t:
//!
//! ```text
//! idf(t)     = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))         (Lucene's, never negative)
//! score(t,d) = idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))
//! ```
//!
//! where N is the number of documents, n(t) the number containing t, tf the
//! count of t in d and |d| the number of tokens of d. A term repeated in the
//! query counts once: repeating a word must not let a query outweigh others.

use super::topk::TopK;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) const K1: f32 = 1.2;
pub(crate) const B: f32 = 0.75;

/// Distinct query terms scored per search; later ones are ignored. A host
/// call is not metered by the guest's fuel, and each term costs up to one
/// pass over the documents: this bounds the host CPU one call can burn.
pub const MAX_QUERY_TERMS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Posting {
    doc: u32,
    tf: u32,
}

/// The frozen index.
pub(crate) struct Bm25 {
    terms: HashMap<Box<str>, u32>,
    /// `postings[offsets[t]..offsets[t + 1]]` are term t's, by document order.
    offsets: Vec<u32>,
    postings: Vec<Posting>,
    idf: Vec<f32>,
    /// Per document, `k1 * (1 - b + b * |d| / avgdl)`: the length part of the
    /// denominator, computed once instead of per posting per search.
    length_norm: Vec<f32>,
    /// Bytes held by the term dictionary's strings (for `size_bytes`).
    term_bytes: usize,
}

/// Calls `f` with each token of `text`, reusing one buffer so indexing a
/// large corpus does not allocate per token.
pub(crate) fn tokenize(text: &str, mut f: impl FnMut(&str)) {
    let mut buf = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            buf.extend(c.to_lowercase());
        } else if !buf.is_empty() {
            f(&buf);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        f(&buf);
    }
}

impl Bm25 {
    /// Indexes `texts` in order; document i is `texts[i]`.
    pub(crate) fn build<'a>(texts: impl ExactSizeIterator<Item = &'a str>) -> Bm25 {
        let n = texts.len();
        let mut terms: HashMap<Box<str>, u32> = HashMap::new();
        let mut df: Vec<u32> = Vec::new();
        // (term, doc, tf), produced in document order.
        let mut triples: Vec<(u32, u32, u32)> = Vec::new();
        let mut doc_len: Vec<u32> = Vec::with_capacity(n);
        let mut doc_terms: Vec<u32> = Vec::new();
        for (doc, text) in texts.enumerate() {
            doc_terms.clear();
            tokenize(text, |tok| {
                let id = match terms.get(tok) {
                    Some(id) => *id,
                    None => {
                        let id = df.len() as u32;
                        terms.insert(tok.into(), id);
                        df.push(0);
                        id
                    }
                };
                doc_terms.push(id);
            });
            doc_len.push(doc_terms.len() as u32);
            doc_terms.sort_unstable();
            for run in doc_terms.chunk_by(|a, b| a == b) {
                df[run[0] as usize] += 1;
                triples.push((run[0], doc as u32, run.len() as u32));
            }
        }
        // Counting sort by term; stable, so each term's postings stay in
        // document order.
        let mut offsets = Vec::with_capacity(df.len() + 1);
        let mut total = 0u32;
        offsets.push(0);
        for d in &df {
            total += d;
            offsets.push(total);
        }
        let mut next: Vec<u32> = offsets[..df.len()].to_vec();
        let mut postings = vec![Posting { doc: 0, tf: 0 }; triples.len()];
        for (term, doc, tf) in triples {
            let slot = &mut next[term as usize];
            postings[*slot as usize] = Posting { doc, tf };
            *slot += 1;
        }
        let nf = n as f64;
        let idf = df
            .iter()
            .map(|&d| (1.0 + (nf - f64::from(d) + 0.5) / (f64::from(d) + 0.5)).ln() as f32)
            .collect();
        let total_tokens: f64 = doc_len.iter().map(|&l| f64::from(l)).sum();
        // All-empty corpus: no postings will be read, any positive avgdl does.
        let avgdl = if total_tokens > 0.0 {
            total_tokens / nf
        } else {
            1.0
        };
        let length_norm = doc_len
            .iter()
            .map(|&l| {
                (f64::from(K1) * (1.0 - f64::from(B) + f64::from(B) * f64::from(l) / avgdl)) as f32
            })
            .collect();
        let term_bytes = terms.keys().map(|k| k.len()).sum();
        Bm25 {
            terms,
            offsets,
            postings,
            idf,
            length_norm,
            term_bytes,
        }
    }

    /// Approximate heap bytes held, including the dictionary's table overhead.
    pub(crate) fn size_bytes(&self) -> usize {
        // A `HashMap<Box<str>, u32>` slot is a fat pointer plus the value and a
        // control byte; the load factor leaves room for about 1/8 more slots.
        let slot = std::mem::size_of::<(Box<str>, u32)>() + 1;
        self.terms.capacity() * slot
            + self.term_bytes
            + self.offsets.capacity() * 4
            + self.postings.capacity() * std::mem::size_of::<Posting>()
            + self.idf.capacity() * 4
            + self.length_norm.capacity() * 4
    }

    /// The `k` best documents for `query`, best first; documents sharing no
    /// term with the query are never returned.
    /// Stops early once `stop` is set (between terms): the job that asked
    /// was dropped.
    pub(crate) fn search(&self, query: &str, k: usize, stop: &AtomicBool) -> Vec<(u32, f32)> {
        let mut top = TopK::new(k);
        if k == 0 || self.postings.is_empty() {
            return top.into_sorted();
        }
        // At most MAX_QUERY_TERMS short entries: a linear scan beats hashing.
        let mut seen: Vec<String> = Vec::new();
        let mut query_terms: Vec<u32> = Vec::new();
        tokenize(query, |tok| {
            // Unknown terms count towards the bound too, so a query of many
            // distinct unknown words is cut off as early as a known one.
            if seen.len() == MAX_QUERY_TERMS || seen.iter().any(|s| s == tok) {
                return;
            }
            seen.push(tok.to_owned());
            if let Some(id) = self.terms.get(tok) {
                query_terms.push(*id);
            }
        });
        if query_terms.is_empty() {
            return top.into_sorted();
        }
        // Term-at-a-time into a dense accumulator: every contribution is > 0
        // (idf > 0, tf ≥ 1), so 0.0 means "not touched yet".
        let mut acc = vec![0f32; self.length_norm.len()];
        let mut touched: Vec<u32> = Vec::new();
        for t in query_terms {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let t = t as usize;
            let idf = self.idf[t];
            let range = self.offsets[t] as usize..self.offsets[t + 1] as usize;
            for p in &self.postings[range] {
                let tf = p.tf as f32;
                let s = idf * tf * (K1 + 1.0) / (tf + self.length_norm[p.doc as usize]);
                let slot = &mut acc[p.doc as usize];
                if *slot == 0.0 {
                    touched.push(p.doc);
                }
                *slot += s;
            }
        }
        for doc in touched {
            top.push(doc, acc[doc as usize]);
        }
        top.into_sorted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(s: &str) -> Vec<String> {
        let mut v = Vec::new();
        tokenize(s, |t| v.push(t.to_owned()));
        v
    }

    #[test]
    fn tokenizer_lowercases_and_splits_on_non_alphanumerics() {
        assert_eq!(
            tokens("Hello, WORLD!  rust-lang 2024 Ünïcode"),
            vec!["hello", "world", "rust", "lang", "2024", "ünïcode"]
        );
        assert!(tokens(" ,.;- ").is_empty());
    }

    /// Hand-computed: N = 3, avgdl = (3 + 2 + 1) / 3 = 2.
    /// "cat" is in docs 0 (tf 2, |d| 3) and 1 (tf 1, |d| 2): n = 2,
    /// idf = ln(1 + 1.5 / 2.5) = ln 1.6.
    #[test]
    fn scores_match_hand_computation() {
        let idx = Bm25::build(["cat cat dog", "cat bird", "fish"].into_iter());
        let idf_cat = 1.6f64.ln();
        let norm = |len: f64| 1.2 * (1.0 - 0.75 + 0.75 * len / 2.0);
        let s0 = idf_cat * 2.0 * 2.2 / (2.0 + norm(3.0));
        let s1 = idf_cat * 1.0 * 2.2 / (1.0 + norm(2.0));
        let hits = idx.search("CAT", 10, &AtomicBool::new(false));
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].0, 0);
        assert_eq!(hits[1].0, 1);
        assert!((f64::from(hits[0].1) - s0).abs() < 1e-5, "{hits:?} vs {s0}");
        assert!((f64::from(hits[1].1) - s1).abs() < 1e-5, "{hits:?} vs {s1}");

        // "fish": n = 1, idf = ln(1 + 2.5 / 1.5); doc 2 has tf 1, |d| 1.
        let idf_fish = (1.0f64 + 2.5 / 1.5).ln();
        let s2 = idf_fish * 2.2 / (1.0 + norm(1.0));
        let hits = idx.search("fish fish cat", 10, &AtomicBool::new(false));
        // Repeated query terms count once: fish + cat for doc 2 is fish alone.
        let doc2 = hits.iter().find(|h| h.0 == 2).unwrap();
        assert!((f64::from(doc2.1) - s2).abs() < 1e-5);
    }

    #[test]
    fn unknown_and_empty_queries_find_nothing() {
        let idx = Bm25::build(["a b", "c"].into_iter());
        assert!(idx.search("zzz", 5, &AtomicBool::new(false)).is_empty());
        assert!(idx.search("", 5, &AtomicBool::new(false)).is_empty());
        assert!(idx.search("a", 0, &AtomicBool::new(false)).is_empty());
        let empty = Bm25::build(std::iter::empty());
        assert!(empty.search("a", 5, &AtomicBool::new(false)).is_empty());
    }

    #[test]
    fn query_terms_beyond_the_bound_are_ignored() {
        let idx = Bm25::build(["needle", "hay"].into_iter());
        let filler: String = (0..MAX_QUERY_TERMS).map(|i| format!("w{i} ")).collect();
        assert!(
            idx.search(&format!("{filler} needle"), 5, &AtomicBool::new(false))
                .is_empty()
        );
        assert_eq!(
            idx.search(&format!("needle {filler}"), 5, &AtomicBool::new(false))[0].0,
            0
        );
    }
}
