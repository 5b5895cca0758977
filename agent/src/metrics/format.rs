//! Exposition formats: OpenMetrics 1.0 text (what prometheus-client writes) and the
//! Prometheus text format 0.0.4, chosen by the scrape's `Accept` header (Prometheus asks
//! for OpenMetrics first; curl and older scrapers get the classic format).
//!
//! The classic format is derived from the OpenMetrics text line by line: no `# EOF` and
//! no `# UNIT`; a counter family's `# HELP`/`# TYPE` name its `_total` sample (in 0.0.4
//! the TYPE line names the sample); an info family becomes a gauge named `<name>_info`
//! (0.0.4 has no info type). Samples, labels and escaping are the same in both.

use prometheus_client::{encoding::text::encode, registry::Registry};

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the Accept header prefers OpenMetrics (any mention of it with a non-zero
/// quality that is not lower than text/plain's).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(a) = accept else { return false };
    let mut om = None;
    let mut text = None;
    for part in a.split(',') {
        let mut it = part.split(';');
        let ty = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .filter_map(|p| p.trim().strip_prefix("q="))
            .filter_map(|q| q.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        let slot = match ty.as_str() {
            "application/openmetrics-text" => &mut om,
            "text/plain" => &mut text,
            _ => continue,
        };
        if slot.is_none_or(|x: f32| q > x) {
            *slot = Some(q);
        }
    }
    match (om, text) {
        (Some(o), Some(t)) => o > 0.0 && o >= t,
        (Some(o), None) => o > 0.0,
        _ => false,
    }
}

/// The registry in the format `accept` asks for: (content type, body).
pub fn render(registry: &Registry, accept: Option<&str>) -> (String, String) {
    let mut om = String::new();
    if encode(&mut om, registry).is_err() {
        // The collectors write to a String; an error means a bug in an encoder.
        om = "# EOF\n".into();
    }
    if wants_openmetrics(accept) {
        (OPENMETRICS.into(), om)
    } else {
        (PROMETHEUS_TEXT.into(), to_prometheus_text(&om))
    }
}

/// OpenMetrics text -> Prometheus text 0.0.4 (see the module documentation).
pub fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // (family name, type) of the current family, from its TYPE line.
    let mut types: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, ""));
            types.insert(name, ty);
        }
    }
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((tag, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            match (types.get(name).copied(), tag) {
                (Some("counter"), _) => {
                    out.push_str(&format!("{tag}{name}_total {tail}\n"));
                }
                (Some("info"), "# TYPE ") => {
                    out.push_str(&format!("# TYPE {name}_info gauge\n"));
                }
                (Some("info"), _) => {
                    out.push_str(&format!("{tag}{name}_info {tail}\n"));
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
