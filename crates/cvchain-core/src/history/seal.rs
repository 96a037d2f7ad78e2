//! What a row may hold when it is written: every text property scrubbed of secrets, and every
//! property and the whole entity bounded by what Table storage counts (`crate::bounds`).

use super::{Prop, Props, Value};
use crate::bounds::{MAX_ENTITY_BYTES, MAX_PROPERTY_UNITS, encoded_bytes, encoded_units, fit};
use crate::redact::scrub;

/// What a property costs in an entity, as the service and Azurite count it (generously).
fn cost(prop: Prop, value: &Value) -> usize {
    let name = 2 * prop.name().len() + 64;
    name + match value {
        Value::Text(s) => (2 * encoded_units(s)).max(encoded_bytes(s)),
        _ => 64,
    }
}

/// One text scrubbed and fitted; withheld should the cut still leave something that reads as a
/// secret.
fn sealed_text(s: &str, max_units: usize) -> String {
    match fit(&scrub(s), max_units) {
        (text, true) if crate::redact::find_leak(&text).is_some() => crate::redact::WITHHELD.into(),
        (text, _) => text,
    }
}

/// Scrubs and bounds a row's properties before they are written: every text redacted (or
/// withheld when a secret survives redaction), cut to [`MAX_PROPERTY_UNITS`], and, should the
/// whole still exceed [`MAX_ENTITY_BYTES`], the largest texts cut further.
pub fn seal(props: &Props) -> Props {
    let mut out = Props::new();
    for (prop, value) in props.iter() {
        let value = match value {
            Value::Text(s) => Value::Text(sealed_text(s, MAX_PROPERTY_UNITS)),
            other => other.clone(),
        };
        out.set(prop, value);
    }
    // A generous bound first (no byte costs more than twelve): most rows are far below it.
    let rough: usize = out
        .iter()
        .map(|(p, v)| 2 * p.name().len() + 64 + v.as_text().map_or(64, |t| 12 * t.len()))
        .sum();
    if rough <= MAX_ENTITY_BYTES {
        return out;
    }
    let mut costs: Vec<(Prop, usize)> = out.iter().map(|(p, v)| (p, cost(p, v))).collect();
    let mut total: usize = costs.iter().map(|(_, c)| c).sum();
    while total > MAX_ENTITY_BYTES {
        // The costliest text is cut to half its size.
        let Some((at, &(prop, before))) = costs
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| p.kind() == super::ValueKind::Text)
            .max_by_key(|(_, (_, c))| *c)
        else {
            break;
        };
        let text = out.text(prop).to_owned();
        let units = encoded_units(&text);
        if units < 256 {
            break;
        }
        out.set(prop, sealed_text(&text, units / 2));
        let after = cost(prop, &out[prop]);
        costs[at].1 = after;
        total = total - before + after;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_rows_fit_the_table_and_hold_no_secret() {
        let mut p = Props::new();
        p.set(Prop::Raw, "\u{85}".repeat(60_000));
        p.set(Prop::Decoded, "\"".repeat(60_000));
        p.set(Prop::ModelUri, format!("https://a/{}", "a".repeat(60_000)));
        p.set(Prop::UnknownType, "x&sig=SECRET");
        p.set(Prop::DequeueCount, Value::Int(3));
        let sealed = seal(&p);
        let total: usize = sealed.iter().map(|(p, v)| cost(p, v)).sum();
        assert!(total <= MAX_ENTITY_BYTES);
        for (_, v) in sealed.iter() {
            if let Some(s) = v.as_text() {
                assert!(encoded_units(s) <= MAX_PROPERTY_UNITS);
            }
        }
        assert_eq!(sealed[Prop::UnknownType], "x&sig=REDACTED");
        assert_eq!(sealed[Prop::DequeueCount], 3i64);
        assert_eq!(seal(&sealed), sealed, "sealing twice changes nothing");

        // Many large texts: the entity bound cuts the largest further.
        let mut p = Props::new();
        for prop in Prop::ALL
            .iter()
            .filter(|p| p.kind() == crate::history::ValueKind::Text)
        {
            p.set(*prop, "€".repeat(32_000));
        }
        let sealed = seal(&p);
        let total: usize = sealed.iter().map(|(p, v)| cost(p, v)).sum();
        assert!(total <= MAX_ENTITY_BYTES, "{total}");
    }
}
