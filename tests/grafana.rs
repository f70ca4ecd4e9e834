//! `docs/grafana-dashboard.json` queries only series the code records: each
//! `agentplane_*` name in it (a histogram's `_bucket` series by its own
//! name) is one the README lists under "Metrics", and it is valid JSON.

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

#[test]
fn the_grafana_dashboard_uses_documented_series() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dash = std::fs::read_to_string(format!("{root}/docs/grafana-dashboard.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&dash).expect("valid JSON");
    assert!(doc["panels"].as_array().unwrap().len() >= 8);
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let start = readme
        .find("- Metrics (")
        .expect("the README's metrics list");
    let documented = names(&readme[start..start + readme[start..].find("\n\n").unwrap()]);
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
