//! `docs/grafana-dashboard.json` queries only series the code records: each
//! `agentplane_*` name in it (a histogram's `_bucket` series by its own
//! name) is one the README lists under "Metrics", and it is valid JSON.
//! And every series the code records is in that list.

use std::collections::BTreeSet;

fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("agentplane_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].trim_end_matches("_bucket").to_string());
        rest = &tail[end..];
    }
    out
}

/// The README's metrics list.
fn documented() -> BTreeSet<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let start = readme
        .find("- Metrics (")
        .expect("the README's metrics list");
    names(&readme[start..start + readme[start..].find("\n\n").unwrap()])
}

/// Series recorded by a `metrics` macro anywhere under `dir`.
fn recorded(dir: &std::path::Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            recorded(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for mac in ["counter!(", "gauge!(", "histogram!("] {
                for (i, _) in text.match_indices(mac) {
                    let args = text[i + mac.len()..].trim_start();
                    if let Some(name) = args.strip_prefix('"') {
                        let name = &name[..name.find('"').unwrap()];
                        out.insert(name.to_string());
                    }
                }
            }
        }
    }
}

#[test]
fn every_recorded_series_is_documented() {
    let mut series = BTreeSet::new();
    recorded(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut series,
    );
    assert!(series.len() >= 15, "{series:?}");
    let documented = documented();
    let missing: Vec<_> = series.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "recorded but not in the README: {missing:?}"
    );
}

#[test]
fn the_grafana_dashboard_uses_documented_series() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dash = std::fs::read_to_string(format!("{root}/docs/grafana-dashboard.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&dash).expect("valid JSON");
    assert!(doc["panels"].as_array().unwrap().len() >= 8);
    let documented = documented();
    let used = names(&dash);
    let unknown: Vec<_> = used.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "undocumented series in the dashboard: {unknown:?}"
    );
    // And the other way: every documented series has a panel.
    let unused: Vec<_> = documented.difference(&used).collect();
    assert!(unused.is_empty(), "series without a panel: {unused:?}");
    assert!(
        dash.contains("histogram_quantile"),
        "quantiles come from buckets"
    );
}
